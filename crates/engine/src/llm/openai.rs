//! OpenAI-compatible chat completions: `POST {base_url}/chat/completions`
//! (OpenAI, vLLM, Ollama, llama.cpp …), plain and streamed.
//!
//! A streamed answer is a series of `data: {chunk}` events ending with
//! `data: [DONE]`: text in `choices[0].delta.content`, tool calls in
//! `choices[0].delta.tool_calls[{index, id?, function: {name?, arguments}}]`
//! (arguments in pieces), `finish_reason` on the last choice chunk, and the
//! usage in a last chunk with no choices (asked for with
//! `stream_options.include_usage`).

use keel_core::message::{Message, Role, ToolCall, Usage};
use keel_core::run::State;
use keel_core::spec::{Agent, ModelSpec};
use reqwest::header;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{DEFAULT_BASE_URL, Decode, Delta, Error, Finish, Response, Scrub, sse};

/// The request for the next answer of the run whose fold is `state`.
pub(super) fn request(
    http: &reqwest::Client,
    agent: &Agent,
    model: &ModelSpec,
    state: &State,
    key: Option<&str>,
    stream: bool,
) -> Result<reqwest::RequestBuilder, Error> {
    let url = super::endpoint(model, DEFAULT_BASE_URL, "chat/completions")?;
    let system = agent.system_prompt();
    let body = ChatRequest {
        model: &model.model,
        messages: wire_messages(&system, &state.messages),
        tools: agent
            .tools()
            .into_iter()
            .map(|t| WireTool {
                kind: "function",
                function: WireFunction {
                    name: t.name,
                    description: t.description,
                    parameters: t.parameters,
                },
            })
            .collect(),
        temperature: model.temperature,
        max_tokens: model.max_tokens,
        stream,
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
    };
    let mut request = http.post(url).json(&body);
    if let Some(key) = key {
        let value = super::secret_header(&format!("Bearer {key}"), model)?;
        request = request.header(header::AUTHORIZATION, value);
    }
    Ok(request)
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    /// `null` only on an assistant message that has tool calls.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Serialize)]
struct WireCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireCallFunction<'a>,
}

#[derive(Serialize)]
struct WireCallFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[derive(Serialize)]
struct WireTool {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction,
}

#[derive(Serialize)]
struct WireFunction {
    name: String,
    description: String,
    parameters: Value,
}

/// The system prompt (when there is one), then the conversation.
fn wire_messages<'a>(system: &'a str, messages: &'a [Message]) -> Vec<WireMessage<'a>> {
    let mut wire = Vec::with_capacity(messages.len() + 1);
    if !system.is_empty() {
        wire.push(WireMessage {
            role: "system",
            content: Some(system),
            tool_calls: Vec::new(),
            tool_call_id: None,
        });
    }
    for message in messages {
        let role = match message.role {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        };
        let tool_calls: Vec<WireCall<'a>> = message
            .tool_calls
            .iter()
            .map(|call| WireCall {
                id: &call.id,
                kind: "function",
                function: WireCallFunction {
                    name: &call.name,
                    arguments: &call.arguments,
                },
            })
            .collect();
        // Servers accept `content: null` only next to tool calls.
        let content = match (message.content.as_deref(), tool_calls.is_empty()) {
            (None, true) => Some(""),
            (content, _) => content,
        };
        wire.push(WireMessage {
            role,
            content,
            tool_calls,
            tool_call_id: message.tool_call_id.as_deref(),
        });
    }
    wire
}

#[derive(Deserialize)]
struct ChatResponse {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
struct Choice {
    message: Answer,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<AnswerCall>>,
}

#[derive(Deserialize)]
struct AnswerCall {
    #[serde(default)]
    id: Option<String>,
    function: AnswerFunction,
}

#[derive(Deserialize)]
struct AnswerFunction {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// Reads a 200 body. The error says what is wrong with it, for the message.
pub(super) fn parse(body: &str, step: u32, spec_model: &str) -> Result<Response, String> {
    let response: ChatResponse = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let Some(choice) = response.choices.into_iter().next() else {
        return Err("no choices".into());
    };
    let finish = Finish::from_wire(choice.finish_reason.as_deref());
    let content = match choice.message.content {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text),
        // Content parts: keep their text.
        Some(Value::Array(parts)) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<String>(),
        ),
        Some(other) => Some(other.to_string()),
    };
    let mut tool_calls = Vec::new();
    for (i, call) in choice
        .message
        .tool_calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        // Arguments stay verbatim; a server sending an object gets it serialized.
        let arguments = match call.function.arguments {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(text)) => text,
            Some(other) => other.to_string(),
        };
        tool_calls.push(ToolCall {
            // Some local servers omit ids; the tool message must still name one.
            id: call
                .id
                .filter(|id| !id.is_empty())
                .unwrap_or_else(|| format!("call_{step}_{i}")),
            name: call.function.name,
            arguments,
        });
    }
    let usage = response.usage.map_or(Usage::default(), |u| Usage {
        input_tokens: u.prompt_tokens.unwrap_or(0),
        output_tokens: u.completion_tokens.unwrap_or(0),
    });
    Ok(Response {
        message: Message::assistant(content, tool_calls),
        usage,
        model: response
            .model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| spec_model.to_string()),
        finish,
    })
}

/// Reads a streamed answer, one `data:` chunk at a time.
pub(super) struct Decoder {
    step: u32,
    spec_model: String,
    scrub: Scrub,
    model: Option<String>,
    content: String,
    /// Calls in the order they first appeared.
    calls: Vec<PartialCall>,
    finish: Option<String>,
    usage: Option<WireUsage>,
}

/// A tool call being assembled from its pieces.
struct PartialCall {
    /// The `index` the provider gave it.
    wire_index: u32,
    id: String,
    /// The id was made up because none came (yet).
    made_up_id: bool,
    name: String,
    arguments: String,
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    model: Option<String>,
    /// Some servers (vLLM, proxies) report a failure mid-stream this way.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: Option<ChunkDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChunkDelta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<CallDelta>>,
}

#[derive(Deserialize)]
struct CallDelta {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<Value>,
}

impl Decoder {
    pub(super) fn new(step: u32, spec_model: &str, scrub: Scrub) -> Decoder {
        Decoder {
            step,
            spec_model: spec_model.to_string(),
            scrub,
            model: None,
            content: String::new(),
            calls: Vec::new(),
            finish: None,
            usage: None,
        }
    }

    /// Adds one tool-call piece, announcing the call when it is new.
    fn call_delta(&mut self, delta: CallDelta, on_delta: &mut (dyn FnMut(Delta) + Send)) {
        let id = delta.id.filter(|id| !id.is_empty());
        let position = match delta.index {
            Some(wire) => self.calls.iter().position(|c| c.wire_index == wire),
            // No index (some local servers): a new id starts a new call, the
            // rest continues the last one.
            None => match &id {
                Some(id) if !self.calls.iter().any(|c| &c.id == id) => None,
                _ => self.calls.len().checked_sub(1),
            },
        };
        let (name, arguments) = match delta.function {
            Some(f) => (
                f.name.unwrap_or_default(),
                match f.arguments {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(text)) => text,
                    Some(other) => other.to_string(),
                },
            ),
            None => (String::new(), String::new()),
        };
        let index = match position {
            Some(index) => {
                let call = &mut self.calls[index];
                if let Some(id) = id
                    && call.made_up_id
                {
                    call.id = id;
                    call.made_up_id = false;
                }
                // Names come whole in one piece; a server repeating it is not
                // writing a longer name.
                if !name.is_empty() && call.name != name {
                    call.name.push_str(&name);
                }
                index
            }
            None => {
                let index = self.calls.len();
                let wire_index = delta.index.unwrap_or_else(|| {
                    self.calls
                        .iter()
                        .map(|c| c.wire_index.saturating_add(1))
                        .max()
                        .unwrap_or(0)
                });
                let made_up_id = id.is_none();
                let id = id.unwrap_or_else(|| format!("call_{}_{index}", self.step));
                on_delta(Delta::ToolCall {
                    index,
                    id: id.clone(),
                    name: name.clone(),
                });
                self.calls.push(PartialCall {
                    wire_index,
                    id,
                    made_up_id,
                    name,
                    arguments: String::new(),
                });
                index
            }
        };
        if !arguments.is_empty() {
            self.calls[index].arguments.push_str(&arguments);
            on_delta(Delta::ToolArguments {
                index,
                fragment: arguments,
            });
        }
    }
}

impl Decode for Decoder {
    const END: &'static str = "`data: [DONE]`";

    fn event(
        &mut self,
        event: sse::Event,
        on_delta: &mut (dyn FnMut(Delta) + Send),
    ) -> Result<bool, Error> {
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(true);
        }
        if data.is_empty() {
            return Ok(false);
        }
        let chunk: Chunk = serde_json::from_str(data).map_err(|e| {
            Error::transient(format!(
                "LLM stream sent an unreadable chunk ({e}): {}",
                self.scrub.text(data)
            ))
        })?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_string);
            return Err(Error::transient(format!(
                "LLM stream reported an error: {}",
                self.scrub.text(&message)
            )));
        }
        if self.model.is_none() {
            self.model = chunk.model.filter(|m| !m.is_empty());
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        // One answer was asked for: read choice 0 only.
        let choices = chunk.choices.unwrap_or_default();
        for choice in choices.into_iter().filter(|c| c.index == 0) {
            if let Some(delta) = choice.delta {
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    self.content.push_str(&text);
                    on_delta(Delta::Text(text));
                }
                for call in delta.tool_calls.unwrap_or_default() {
                    self.call_delta(call, on_delta);
                }
            }
            if choice.finish_reason.is_some() {
                self.finish = choice.finish_reason;
            }
        }
        Ok(false)
    }

    fn into_response(self) -> Response {
        let content = (!self.content.is_empty()).then_some(self.content);
        let tool_calls = self
            .calls
            .into_iter()
            .map(|c| ToolCall {
                id: c.id,
                name: c.name,
                arguments: c.arguments,
            })
            .collect();
        let usage = self.usage.map_or(Usage::default(), |u| Usage {
            input_tokens: u.prompt_tokens.unwrap_or(0),
            output_tokens: u.completion_tokens.unwrap_or(0),
        });
        Response {
            message: Message::assistant(content, tool_calls),
            usage,
            model: self.model.unwrap_or(self.spec_model),
            finish: Finish::from_wire(self.finish.as_deref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::decode_every_split;

    const TEXT: &[u8] = include_bytes!("fixtures/openai_stream_text.sse");
    const TOOL_CALLS: &[u8] = include_bytes!("fixtures/openai_stream_tool_calls.sse");

    fn decoder() -> Decoder {
        Decoder::new(2, "gpt-spec", Scrub::default())
    }

    /// `stream` with its line ends written as `ending`.
    fn with_line_ends(stream: &[u8], ending: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(stream.len() * 2);
        for &byte in stream {
            if byte == b'\n' {
                out.extend_from_slice(ending.as_bytes());
            } else {
                out.push(byte);
            }
        }
        out
    }

    fn text(t: &str) -> Delta {
        Delta::Text(t.into())
    }

    fn args(index: usize, fragment: &str) -> Delta {
        Delta::ToolArguments {
            index,
            fragment: fragment.into(),
        }
    }

    fn call(index: usize, id: &str, name: &str) -> Delta {
        Delta::ToolCall {
            index,
            id: id.into(),
            name: name.into(),
        }
    }

    #[test]
    fn streamed_text_in_every_split_and_line_end() {
        for ending in ["\n", "\r\n", "\r"] {
            let (result, deltas) = decode_every_split(decoder, &with_line_ends(TEXT, ending));
            assert_eq!(
                result.unwrap(),
                Response {
                    message: Message::assistant(
                        Some("Order 42 shipped — café ☕ 🚚.".into()),
                        Vec::new()
                    ),
                    usage: Usage {
                        input_tokens: 31,
                        output_tokens: 9
                    },
                    model: "gpt-4o-mini-2024-07-18".into(),
                    finish: Finish::Stop,
                }
            );
            assert_eq!(
                deltas,
                vec![text("Order"), text(" 42 shipped"), text(" — café ☕ 🚚.")]
            );
        }
    }

    #[test]
    fn streamed_parallel_tool_calls() {
        let (result, deltas) = decode_every_split(decoder, TOOL_CALLS);
        let response = result.unwrap();
        assert_eq!(response.message.content, None);
        assert_eq!(
            response.message.tool_calls,
            vec![
                ToolCall {
                    id: "call_DdmO9pD3xa9XTPNJ32zg2hcA".into(),
                    name: "lookup".into(),
                    arguments: r#"{"id": "42"}"#.into(),
                },
                ToolCall {
                    id: "call_Kq3cZ1mN8vB2xL5tR7yW0pJe".into(),
                    name: "notes".into(),
                    arguments: r#"{"path": "runbook.md"}"#.into(),
                },
            ]
        );
        assert_eq!(
            response.usage,
            Usage {
                input_tokens: 112,
                output_tokens: 41
            }
        );
        assert_eq!(response.model, "gpt-4o-2024-08-06");
        assert_eq!(response.finish, Finish::ToolCalls);
        assert_eq!(
            deltas,
            vec![
                call(0, "call_DdmO9pD3xa9XTPNJ32zg2hcA", "lookup"),
                args(0, r#"{"id"#),
                args(0, r#"": "4"#),
                args(0, r#"2"}"#),
                call(1, "call_Kq3cZ1mN8vB2xL5tR7yW0pJe", "notes"),
                args(1, r#"{"path": "run"#),
                args(1, r#"book.md"}"#),
            ]
        );
    }

    #[test]
    fn lenient_streams_of_local_servers() {
        // Whole calls without index or id, arguments as an object, no usage,
        // no model, a repeated name, events after [DONE] ignored.
        let stream = br#"data: {"choices":[{"delta":{"role":"assistant","tool_calls":[{"function":{"name":"lookup","arguments":{"id":"7"}}}]}}]}

data: {"choices":[{"delta":{"tool_calls":[{"id":"call_z","function":{"name":"notes","arguments":"{}"}}]}}]}

data: {"choices":[{"delta":{"tool_calls":[{"index":1,"function":{"name":"notes"}}]}}]}

data: {"choices":[{"index":1,"delta":{"content":"second choice: ignored"}}]}

data: {"choices":[{"delta":{},"finish_reason":"tool_calls"}]}

data: [DONE]

data: not even JSON

"#;
        let (result, deltas) = decode_every_split(decoder, stream);
        let response = result.unwrap();
        assert_eq!(
            response.message.tool_calls,
            vec![
                ToolCall {
                    id: "call_2_0".into(),
                    name: "lookup".into(),
                    arguments: r#"{"id":"7"}"#.into(),
                },
                ToolCall {
                    id: "call_z".into(),
                    name: "notes".into(),
                    arguments: "{}".into(),
                },
            ]
        );
        assert_eq!(response.usage, Usage::default());
        assert_eq!(response.model, "gpt-spec");
        assert_eq!(
            deltas,
            vec![
                call(0, "call_2_0", "lookup"),
                args(0, r#"{"id":"7"}"#),
                call(1, "call_z", "notes"),
                args(1, "{}"),
            ]
        );
    }

    #[test]
    fn broken_streams_are_transient_and_named() {
        let error = |stream: &[u8]| {
            let (result, _) = decode_every_split(decoder, stream);
            let error = result.unwrap_err();
            assert!(error.starts_with("Transient"), "{error}");
            error
        };
        // Cut before its end marker: after a whole chunk, and in the middle of one.
        let done = TEXT.len() - "data: [DONE]\n\n".len();
        let cut = error(&TEXT[..done]);
        assert!(cut.contains("ended before `data: [DONE]`"), "{cut}");
        assert_eq!(error(&TEXT[..done - 40]), cut);

        let bad = error(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":5}}]}\n\n");
        assert!(
            bad.contains("unreadable chunk (invalid type: integer `5`"),
            "{bad}"
        );
        let bad = error(b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]\n\n");
        assert!(
            bad.contains("unreadable chunk") && bad.contains("EOF"),
            "{bad}"
        );

        let reported = error(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
              data: {\"error\":{\"message\":\"upstream overloaded\",\"type\":\"server_error\"}}\n\n",
        );
        assert!(
            reported.contains("reported an error: upstream overloaded"),
            "{reported}"
        );

        let binary = error(b"data: {\"choices\":[]}\n\ndata: \xC3\x28\n\n");
        assert!(
            binary.contains("not a valid event stream: line 3"),
            "{binary}"
        );
    }
}
