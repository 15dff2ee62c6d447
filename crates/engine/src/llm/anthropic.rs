//! The Anthropic Messages API: `POST {base_url}/messages`, plain and streamed.
//!
//! Differences from chat completions that matter here: the system prompt is
//! the top-level `system` field; `max_tokens` is required
//! ([`ANTHROPIC_MAX_TOKENS`] when the spec sets none); an assistant's tool
//! calls are `tool_use` content blocks whose `input` is a JSON object (Keel
//! keeps the model's arguments as text, so they are serialized on the way in
//! and parsed on the way out); tool results go back as `tool_result` blocks
//! of a user message.
//!
//! A streamed answer is a series of named events: `message_start` (model,
//! input tokens), then per content block `content_block_start` (text, or
//! `tool_use` with id and name), `content_block_delta` (`text_delta`, or
//! `input_json_delta` with a piece of the input JSON) and
//! `content_block_stop`; then `message_delta` (stop reason, cumulative output
//! tokens) and `message_stop`. `ping` events keep the connection alive; an
//! `error` event ends the stream early (`overloaded_error` is worth a retry).
//! Unknown event and block types are skipped, as the API asks of clients.

use keel_core::message::{Message, Role, ToolCall, Usage};
use keel_core::run::State;
use keel_core::spec::{Agent, ModelSpec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    ANTHROPIC_BASE_URL, ANTHROPIC_MAX_TOKENS, ANTHROPIC_VERSION, Decode, Delta, Error, Finish,
    Response, Scrub, sse,
};

/// The request for the next answer of the run whose fold is `state`.
pub(super) fn request(
    http: &reqwest::Client,
    agent: &Agent,
    model: &ModelSpec,
    state: &State,
    key: Option<&str>,
    stream: bool,
) -> Result<reqwest::RequestBuilder, Error> {
    let url = super::endpoint(model, ANTHROPIC_BASE_URL, "messages")?;
    let system = agent.system_prompt();
    let body = MessagesRequest {
        model: &model.model,
        max_tokens: model.max_tokens.unwrap_or(ANTHROPIC_MAX_TOKENS),
        system: &system,
        messages: wire_messages(&state.messages),
        tools: agent
            .tools()
            .into_iter()
            .map(|t| WireTool {
                name: t.name,
                description: t.description,
                input_schema: t.parameters,
            })
            .collect(),
        temperature: model.temperature,
        stream,
    };
    let mut request = http
        .post(url)
        .header("anthropic-version", ANTHROPIC_VERSION)
        .json(&body);
    if let Some(key) = key {
        request = request.header("x-api-key", super::secret_header(key, model)?);
    }
    Ok(request)
}

#[derive(Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "str::is_empty")]
    system: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: Vec<Block<'a>>,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
    },
    ToolResult {
        tool_use_id: &'a str,
        #[serde(skip_serializing_if = "str::is_empty")]
        content: &'a str,
    },
}

#[derive(Serialize)]
struct WireTool {
    name: String,
    description: String,
    input_schema: Value,
}

/// The conversation as Messages API turns. Tool results become `tool_result`
/// blocks of a user turn; consecutive turns of one role are merged (the
/// results of parallel calls must share one user turn, and a correction after
/// them joins it); empty text is left out (the API refuses empty blocks), and
/// so is a turn left with nothing.
fn wire_messages(messages: &[Message]) -> Vec<WireMessage<'_>> {
    let mut wire: Vec<WireMessage<'_>> = Vec::with_capacity(messages.len());
    for message in messages {
        let text = message.content.as_deref().filter(|t| !t.is_empty());
        let (role, blocks) = match message.role {
            Role::User => (
                "user",
                text.map(|text| Block::Text { text }).into_iter().collect(),
            ),
            Role::Tool => (
                "user",
                vec![Block::ToolResult {
                    tool_use_id: message.tool_call_id.as_deref().unwrap_or_default(),
                    content: message.content.as_deref().unwrap_or_default(),
                }],
            ),
            Role::Assistant => {
                let mut blocks: Vec<Block<'_>> =
                    text.map(|text| Block::Text { text }).into_iter().collect();
                for call in &message.tool_calls {
                    blocks.push(Block::ToolUse {
                        id: &call.id,
                        name: &call.name,
                        input: input(&call.arguments),
                    });
                }
                ("assistant", blocks)
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match wire.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => wire.push(WireMessage {
                role,
                content: blocks,
            }),
        }
    }
    wire
}

/// A call's arguments as the `input` object the API requires. Arguments that
/// are not a JSON object (the model wrote bad JSON, or the stream was cut at
/// `max_tokens`) were already refused and the tool result the model gets says
/// so, quoting them; the API refuses anything but an object here (400
/// "Input should be a valid dictionary"), so they go back as `{}`.
fn input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(object @ Value::Object(_)) => object,
        _ => Value::Object(Map::new()),
    }
}

/// The text Keel keeps for a tool call's `input`.
fn arguments(input: Value) -> String {
    match input {
        Value::Null => "{}".to_string(),
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
struct MessageResponse {
    content: Vec<ContentBlock>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ContentBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    /// Thinking, server tools and blocks added later: not part of the answer.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// All input tokens: the uncached ones plus those written to and read
    /// from the prompt cache (the API counts them apart).
    fn input(&self) -> Option<u64> {
        let uncached = self.input_tokens?;
        Some(
            uncached
                .saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0)),
        )
    }
}

/// Reads a 200 body. The error says what is wrong with it, for the message.
pub(super) fn parse(body: &str, _step: u32, spec_model: &str) -> Result<Response, String> {
    let response: MessageResponse = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for block in response.content {
        match block {
            ContentBlock::Text { text: part } => text.push_str(&part),
            ContentBlock::ToolUse { id, name, input } => tool_calls.push(ToolCall {
                id,
                name,
                arguments: arguments(input),
            }),
            ContentBlock::Other => {}
        }
    }
    let usage = response.usage.map_or(Usage::default(), |u| Usage {
        input_tokens: u.input().unwrap_or(0),
        output_tokens: u.output_tokens.unwrap_or(0),
    });
    Ok(Response {
        message: Message::assistant((!text.is_empty()).then_some(text), tool_calls),
        usage,
        model: response
            .model
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| spec_model.to_string()),
        finish: Finish::from_wire(response.stop_reason.as_deref()),
    })
}

/// Whether an API error type (`error.type` of an error body or event) may go
/// away on a retry: overloaded, rate limited, internal or timed out (and any
/// type added later) yes; a request, key or account problem no.
fn transient_kind(kind: &str) -> bool {
    !matches!(
        kind,
        "invalid_request_error"
            | "authentication_error"
            | "permission_error"
            | "not_found_error"
            | "request_too_large"
            | "billing_error"
    )
}

/// Reads a streamed answer, one event at a time.
pub(super) struct Decoder {
    spec_model: String,
    scrub: Scrub,
    model: Option<String>,
    /// Content blocks in the order they started.
    blocks: Vec<StreamBlock>,
    /// Tool-use blocks so far (the next one's position among the calls).
    tools: usize,
    input_tokens: u64,
    output_tokens: u64,
    stop_reason: Option<String>,
}

/// A content block being assembled.
struct StreamBlock {
    /// The `index` the API gave it.
    wire_index: u32,
    kind: BlockKind,
}

enum BlockKind {
    Text(String),
    Tool {
        /// Position among the answer's tool calls.
        position: usize,
        id: String,
        name: String,
        /// The `input_json_delta` pieces so far.
        json: String,
        /// The `input` of `content_block_start` (`{}`; used when no piece comes).
        initial: Value,
    },
    /// Thinking and other blocks: not part of the answer.
    Other,
}

impl BlockKind {
    fn name(&self) -> &'static str {
        match self {
            BlockKind::Text(_) => "text",
            BlockKind::Tool { .. } => "tool_use",
            BlockKind::Other => "non-text, non-tool",
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        index: u32,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {},
    MessageDelta {
        #[serde(default)]
        delta: Option<MessageDeltaBody>,
        #[serde(default)]
        usage: Option<WireUsage>,
    },
    MessageStop {},
    Error {
        error: WireError,
    },
    /// `ping` and event types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct StartMessage {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StartBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// Thinking, signatures, citations and delta types added later.
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
}

impl Decoder {
    pub(super) fn new(_step: u32, spec_model: &str, scrub: Scrub) -> Decoder {
        Decoder {
            spec_model: spec_model.to_string(),
            scrub,
            model: None,
            blocks: Vec::new(),
            tools: 0,
            input_tokens: 0,
            output_tokens: 0,
            stop_reason: None,
        }
    }

    fn block(&mut self, index: u32) -> Result<&mut StreamBlock, Error> {
        self.blocks
            .iter_mut()
            .find(|b| b.wire_index == index)
            .ok_or_else(|| {
                Error::transient(format!(
                    "LLM stream sent a content_block_delta for block {index}, which never started"
                ))
            })
    }
}

impl Decode for Decoder {
    const END: &'static str = "its `message_stop` event";

    fn event(
        &mut self,
        event: sse::Event,
        on_delta: &mut (dyn FnMut(Delta) + Send),
    ) -> Result<bool, Error> {
        if event.data.trim().is_empty() {
            return Ok(false);
        }
        let parsed: StreamEvent = serde_json::from_str(&event.data).map_err(|e| {
            let name = if event.event.is_empty() {
                "an unnamed".to_string()
            } else {
                format!("a `{}`", event.event)
            };
            Error::transient(format!(
                "LLM stream sent {name} event that is unreadable ({e}): {}",
                self.scrub.text(&event.data)
            ))
        })?;
        match parsed {
            StreamEvent::MessageStart { message } => {
                self.model = message.model.filter(|m| !m.is_empty());
                if let Some(usage) = message.usage {
                    self.input_tokens = usage.input().unwrap_or(0);
                    self.output_tokens = usage.output_tokens.unwrap_or(0);
                }
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => {
                if self.blocks.iter().any(|b| b.wire_index == index) {
                    return Err(Error::transient(format!(
                        "LLM stream started content block {index} twice"
                    )));
                }
                let kind = match content_block {
                    StartBlock::Text { text } => {
                        if !text.is_empty() {
                            on_delta(Delta::Text(text.clone()));
                        }
                        BlockKind::Text(text)
                    }
                    StartBlock::ToolUse { id, name, input } => {
                        let position = self.tools;
                        self.tools += 1;
                        on_delta(Delta::ToolCall {
                            index: position,
                            id: id.clone(),
                            name: name.clone(),
                        });
                        BlockKind::Tool {
                            position,
                            id,
                            name,
                            json: String::new(),
                            initial: input,
                        }
                    }
                    StartBlock::Other => BlockKind::Other,
                };
                self.blocks.push(StreamBlock {
                    wire_index: index,
                    kind,
                });
            }
            StreamEvent::ContentBlockDelta { index, delta } => {
                let block = self.block(index)?;
                match (&mut block.kind, delta) {
                    (BlockKind::Text(text), BlockDelta::TextDelta { text: piece }) => {
                        text.push_str(&piece);
                        if !piece.is_empty() {
                            on_delta(Delta::Text(piece));
                        }
                    }
                    (
                        BlockKind::Tool { position, json, .. },
                        BlockDelta::InputJsonDelta { partial_json },
                    ) => {
                        json.push_str(&partial_json);
                        if !partial_json.is_empty() {
                            on_delta(Delta::ToolArguments {
                                index: *position,
                                fragment: partial_json,
                            });
                        }
                    }
                    (_, BlockDelta::Other) | (BlockKind::Other, _) => {}
                    (kind, BlockDelta::TextDelta { .. }) => {
                        return Err(Error::transient(format!(
                            "LLM stream sent a text_delta for block {index}, a {} block",
                            kind.name()
                        )));
                    }
                    (kind, BlockDelta::InputJsonDelta { .. }) => {
                        return Err(Error::transient(format!(
                            "LLM stream sent an input_json_delta for block {index}, a {} block",
                            kind.name()
                        )));
                    }
                }
            }
            StreamEvent::ContentBlockStop {} | StreamEvent::Other => {}
            StreamEvent::MessageDelta { delta, usage } => {
                if let Some(reason) = delta.and_then(|d| d.stop_reason) {
                    self.stop_reason = Some(reason);
                }
                if let Some(usage) = usage {
                    // Counts in `message_delta` are cumulative.
                    if let Some(input) = usage.input() {
                        self.input_tokens = input;
                    }
                    if let Some(output) = usage.output_tokens {
                        self.output_tokens = output;
                    }
                }
            }
            StreamEvent::MessageStop {} => return Ok(true),
            StreamEvent::Error { error } => {
                let message = format!(
                    "LLM stream reported an error: {}: {}",
                    error.kind,
                    self.scrub.text(&error.message)
                );
                return Err(if transient_kind(&error.kind) {
                    Error::transient(message)
                } else {
                    Error::permanent(message)
                });
            }
        }
        Ok(false)
    }

    fn into_response(self) -> Response {
        let mut text = String::new();
        let mut tool_calls = Vec::new();
        for block in self.blocks {
            match block.kind {
                BlockKind::Text(part) => text.push_str(&part),
                BlockKind::Tool {
                    id,
                    name,
                    json,
                    initial,
                    ..
                } => tool_calls.push(ToolCall {
                    id,
                    name,
                    arguments: if json.is_empty() {
                        arguments(initial)
                    } else {
                        json
                    },
                }),
                BlockKind::Other => {}
            }
        }
        Response {
            message: Message::assistant((!text.is_empty()).then_some(text), tool_calls),
            usage: Usage {
                input_tokens: self.input_tokens,
                output_tokens: self.output_tokens,
            },
            model: self.model.unwrap_or(self.spec_model),
            finish: Finish::from_wire(self.stop_reason.as_deref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::llm::decode_every_split;

    const TEXT: &[u8] = include_bytes!("fixtures/anthropic_stream_text.sse");
    const TOOL_USE: &[u8] = include_bytes!("fixtures/anthropic_stream_tool_use.sse");
    const ERROR: &[u8] = include_bytes!("fixtures/anthropic_stream_error.sse");
    const TEXT_JSON: &str = include_str!("fixtures/anthropic_message_text.json");
    const TOOL_USE_JSON: &str = include_str!("fixtures/anthropic_message_tool_use.json");

    fn decoder() -> Decoder {
        Decoder::new(2, "claude-spec", Scrub::default())
    }

    fn text_answer() -> Response {
        Response {
            message: Message::assistant(Some("Order 42 shipped — café ☕ 🚚.".into()), Vec::new()),
            usage: Usage {
                input_tokens: 25,
                output_tokens: 15,
            },
            model: "claude-sonnet-4-5-20250929".into(),
            finish: Finish::Stop,
        }
    }

    #[test]
    fn streamed_text_matches_the_plain_answer() {
        let (result, deltas) = decode_every_split(decoder, TEXT);
        assert_eq!(result.unwrap(), text_answer());
        assert_eq!(
            deltas,
            vec![
                Delta::Text("Order 42".into()),
                Delta::Text(" shipped — café ☕ 🚚.".into())
            ]
        );
        assert_eq!(parse(TEXT_JSON, 2, "claude-spec").unwrap(), text_answer());
    }

    #[test]
    fn streamed_tool_use() {
        let (result, deltas) = decode_every_split(decoder, TOOL_USE);
        let response = result.unwrap();
        assert_eq!(
            response.message.content.as_deref(),
            Some("Let me look that up."),
            "thinking is not part of the answer"
        );
        assert_eq!(
            response.message.tool_calls,
            vec![
                ToolCall {
                    id: "toolu_01T1x1fJ34qAmk2tNTrN7Up6".into(),
                    name: "lookup".into(),
                    arguments: r#"{"id": "42"}"#.into(),
                },
                ToolCall {
                    id: "toolu_01VhB9Ejc2kQ3t4XmRz8aPqs".into(),
                    name: "list_files".into(),
                    arguments: "{}".into(),
                },
            ]
        );
        let usage = Usage {
            input_tokens: 572,
            output_tokens: 89,
        };
        assert_eq!(response.usage, usage, "cache reads count as input");
        assert_eq!(response.finish, Finish::ToolCalls);
        assert_eq!(
            deltas,
            vec![
                Delta::Text("Let me look".into()),
                Delta::Text(" that up.".into()),
                Delta::ToolCall {
                    index: 0,
                    id: "toolu_01T1x1fJ34qAmk2tNTrN7Up6".into(),
                    name: "lookup".into()
                },
                Delta::ToolArguments {
                    index: 0,
                    fragment: r#"{"id": "4"#.into()
                },
                Delta::ToolArguments {
                    index: 0,
                    fragment: r#"2"}"#.into()
                },
                Delta::ToolCall {
                    index: 1,
                    id: "toolu_01VhB9Ejc2kQ3t4XmRz8aPqs".into(),
                    name: "list_files".into()
                },
            ]
        );

        let plain = parse(TOOL_USE_JSON, 2, "claude-spec").unwrap();
        assert_eq!(plain.message.content, response.message.content);
        assert_eq!(plain.message.tool_calls[0].arguments, r#"{"id":"42"}"#);
        assert_eq!(plain.message.tool_calls[1].arguments, "{}");
        assert_eq!((plain.usage, plain.finish), (usage, Finish::ToolCalls));
    }

    #[test]
    fn errors_in_the_stream() {
        let (result, deltas) = decode_every_split(decoder, ERROR);
        let error = result.unwrap_err();
        assert!(
            error.starts_with("Transient")
                && error.contains("reported an error: overloaded_error: Overloaded"),
            "{error}"
        );
        assert_eq!(deltas, vec![Delta::Text("Order".into())]);

        let check = |stream: &str, transient: bool, needle: &str| {
            let (result, _) = decode_every_split(decoder, stream.as_bytes());
            let error = result.unwrap_err();
            let kind = if transient { "Transient" } else { "Permanent" };
            assert!(
                error.starts_with(kind) && error.contains(needle),
                "{error} should be {kind} and contain {needle}"
            );
        };
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":1}}}\n\n";
        check(
            &format!(
                "{start}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"invalid_request_error\",\"message\":\"prompt is too long\"}}}}\n\n"
            ),
            false,
            "invalid_request_error: prompt is too long",
        );
        let stop = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let cut = std::str::from_utf8(&TEXT[..TEXT.len() - stop.len()]).unwrap();
        check(cut, true, "ended before its `message_stop` event");
        check(
            &format!(
                "{start}event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":3,\"delta\":{{\"type\":\"text_delta\",\"text\":\"x\"}}}}\n\n"
            ),
            true,
            "content_block_delta for block 3, which never started",
        );
        check(
            &format!(
                "{start}event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0,\"content_block\":{{\"type\":\"text\",\"text\":\"\"}}}}\n\n\
                 event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"input_json_delta\",\"partial_json\":\"{{\"}}}}\n\n"
            ),
            true,
            "input_json_delta for block 0, a text block",
        );
        check(
            &format!(
                "{start}event: content_block_start\ndata: {{\"type\":\"content_block_start\",\"index\":0}}\n\n"
            ),
            true,
            "a `content_block_start` event that is unreadable (missing field `content_block`",
        );
        check(
            "data: {\"type\": \"message_start\", \"message\": \n\n",
            true,
            "an unnamed event that is unreadable",
        );
    }

    #[test]
    fn conversation_as_messages_api_turns() {
        let calls = vec![
            ToolCall {
                id: "toolu_a".into(),
                name: "lookup".into(),
                arguments: r#"{"id":"42"}"#.into(),
            },
            ToolCall {
                id: "toolu_b".into(),
                name: "lookup".into(),
                arguments: r#"{"id": 4"#.into(),
            },
            ToolCall {
                id: "toolu_c".into(),
                name: "list_files".into(),
                arguments: String::new(),
            },
        ];
        let messages = vec![
            Message::user("where is order 42?"),
            Message::assistant(Some("Looking.".into()), calls),
            Message::tool("toolu_a", "shipped"),
            Message::tool("toolu_b", "error: arguments of `lookup` are not valid JSON"),
            Message::tool("toolu_c", ""),
            Message::assistant(None, Vec::new()),
            Message::user("error: the reply was empty"),
        ];
        let wire = serde_json::to_value(wire_messages(&messages)).unwrap();
        assert_eq!(
            wire,
            json!([
                {"role": "user", "content": [{"type": "text", "text": "where is order 42?"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Looking."},
                    {"type": "tool_use", "id": "toolu_a", "name": "lookup", "input": {"id": "42"}},
                    {"type": "tool_use", "id": "toolu_b", "name": "lookup", "input": {}},
                    {"type": "tool_use", "id": "toolu_c", "name": "list_files", "input": {}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_a", "content": "shipped"},
                    {"type": "tool_result", "tool_use_id": "toolu_b", "content": "error: arguments of `lookup` are not valid JSON"},
                    {"type": "tool_result", "tool_use_id": "toolu_c"},
                    {"type": "text", "text": "error: the reply was empty"}
                ]}
            ])
        );
    }
}
