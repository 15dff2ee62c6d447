//! LLM providers: turn a run's conversation into one model answer.
//!
//! [`Client::complete`] rebuilds the request from the run's fold (the system
//! prompt of the pinned agent version, then the journaled messages), so a step
//! retried after a crash sends the same conversation. Failures are classified
//! once, here: [`Error::Transient`] is worth retrying, [`Error::Permanent`] is
//! not until someone fixes the spec or the environment.
//!
//! Two providers:
//! * `openai`: any OpenAI-compatible `POST {base_url}/chat/completions`
//!   (OpenAI, vLLM, Ollama, llama.cpp).
//! * `scripted`: replays `model.script`, one turn per step, with no network: a
//!   stand-in for offline demos and tests, never a real model.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_core::RunId;
use keel_core::message::{Message, Role, ToolCall, Usage};
use keel_core::run::State;
use keel_core::spec::{Agent, Provider, clip, tool_description, tool_parameters};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where OpenAI-compatible requests go when the spec names no `base_url`.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// How many bytes of an error body go into an error message.
const ERROR_BODY_BYTES: usize = 300;

/// Reads an environment variable; replaceable for tests and embedding.
type Lookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Calls the model an agent spec names. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    env: Lookup,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

/// One model answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    /// The assistant message, tool call arguments exactly as the model wrote them.
    pub message: Message,
    /// Tokens the call used.
    pub usage: Usage,
    /// The model that answered, as the provider named it.
    pub model: String,
}

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Worth retrying: network error, timeout, 408, 429, 5xx, an unparseable 200 body.
    #[error("{message}")]
    Transient {
        /// What happened, safe to journal and show (no headers, no key).
        message: String,
        /// How long the provider asked us to wait (`Retry-After` on 429/503).
        retry_after: Option<Duration>,
    },
    /// Retrying cannot help until someone fixes something: 400, 401, 403, 404,
    /// a missing API key variable, an invalid base URL, a script that ran out.
    #[error("{message}")]
    Permanent {
        /// What happened and, where we know, what to fix.
        message: String,
    },
}

impl Error {
    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Transient { .. })
    }

    /// The wait the provider asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Transient { retry_after, .. } => *retry_after,
            Error::Permanent { .. } => None,
        }
    }

    fn transient(message: String) -> Error {
        Error::Transient {
            message,
            retry_after: None,
        }
    }

    fn permanent(message: String) -> Error {
        Error::Permanent { message }
    }
}

impl Client {
    /// A client reading API keys from the process environment at call time.
    pub fn new(http: reqwest::Client) -> Client {
        Client {
            http,
            env: Arc::new(|name| std::env::var(name).ok()),
        }
    }

    /// Replaces the process environment as the source of API keys.
    pub fn with_env(
        mut self,
        lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Client {
        self.env = Arc::new(lookup);
        self
    }

    /// Asks the model for step `step` (1-based) of the run whose fold is `state`.
    pub async fn complete(
        &self,
        agent: &Agent,
        state: &State,
        step: u32,
    ) -> Result<Response, Error> {
        match agent.spec.model.provider {
            Provider::Openai => self.openai(agent, state, step).await,
            Provider::Scripted => scripted(agent, state, step),
        }
    }

    async fn openai(&self, agent: &Agent, state: &State, step: u32) -> Result<Response, Error> {
        let model = &agent.spec.model;
        let base = model.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let endpoint = format!("{}/chat/completions", base.trim_end_matches('/'));
        let url = reqwest::Url::parse(&endpoint).map_err(|e| {
            Error::permanent(format!("model.base_url `{base}` is not a valid URL: {e}"))
        })?;

        let mut key = None;
        if let Some(var) = &model.api_key_env {
            match (self.env)(var) {
                Some(value) if !value.is_empty() => key = Some(value),
                _ => {
                    return Err(Error::permanent(format!(
                        "environment variable `{var}` (model.api_key_env) is not set on the server"
                    )));
                }
            }
        }

        let body = ChatRequest {
            model: &model.model,
            messages: wire_messages(&agent.spec.system, &state.messages),
            tools: agent
                .spec
                .tools
                .iter()
                .map(|t| WireTool {
                    kind: "function",
                    function: WireFunction {
                        name: &t.name,
                        description: tool_description(t),
                        parameters: tool_parameters(t),
                    },
                })
                .collect(),
            temperature: model.temperature,
            max_tokens: model.max_tokens,
        };
        let mut request = self
            .http
            .post(url)
            .timeout(model.timeout)
            .header("traceparent", traceparent(state.run_id))
            .json(&body);
        if let Some(key) = &key {
            let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                let var = model.api_key_env.as_deref().unwrap_or_default();
                Error::permanent(format!(
                    "the value of `{var}` is not a valid HTTP header value"
                ))
            })?;
            value.set_sensitive(true);
            request = request.header(header::AUTHORIZATION, value);
        }

        let started = Instant::now();
        let redact = |text: &str| match &key {
            Some(key) if !key.is_empty() => text.replace(key.as_str(), "[redacted]"),
            _ => text.to_string(),
        };
        let response = request
            .send()
            .await
            .map_err(|e| Error::transient(describe(e, model.timeout)))?;
        let status = response.status();
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                retry_after(response.headers())
            }
            _ => None,
        };
        let text = response
            .text()
            .await
            .map_err(|e| Error::transient(describe(e, model.timeout)))?;
        tracing::debug!(
            run_id = %state.run_id,
            step,
            status = status.as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "llm call returned"
        );

        if !status.is_success() {
            let message = format!(
                "LLM endpoint returned HTTP {status}: {}",
                clip(&redact(&text), ERROR_BODY_BYTES)
            );
            let transient = status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT;
            return Err(if transient {
                Error::Transient {
                    message,
                    retry_after,
                }
            } else {
                Error::permanent(message)
            });
        }
        parse_answer(&text, step, &model.model).map_err(|problem| {
            Error::transient(format!(
                "LLM endpoint returned HTTP {status} with an unreadable body ({problem}): {}",
                clip(&redact(&text), ERROR_BODY_BYTES)
            ))
        })
    }
}

/// A W3C `traceparent` for an outgoing call of run `run_id`: the run's trace id
/// and a fresh, non-zero span id, sampled.
pub(crate) fn traceparent(run_id: RunId) -> String {
    format!("00-{}-{:016x}-01", run_id.trace_id(), fastrand::u64(1..))
}

/// Reads `Retry-After` as seconds (HTTP dates are ignored), at most a day.
pub(crate) fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let seconds: f64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(seconds.min(86_400.0)))
}

/// A network failure in words, without the URL; `timeout` is the limit that applied.
fn describe(error: reqwest::Error, timeout: Duration) -> String {
    if error.is_timeout() {
        return format!(
            "LLM call timed out after {}",
            keel_core::spec::human_duration::format(timeout)
        );
    }
    let error = error.without_url();
    let mut message = format!("LLM call failed: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
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
struct WireTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: WireFunction<'a>,
}

#[derive(Serialize)]
struct WireFunction<'a> {
    name: &'a str,
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
fn parse_answer(body: &str, step: u32, spec_model: &str) -> Result<Response, String> {
    let response: ChatResponse = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let Some(choice) = response.choices.into_iter().next() else {
        return Err("no choices".into());
    };
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
    })
}

/// Replays turn `step` of the script. Not a model: a stand-in for demos and tests.
fn scripted(agent: &Agent, state: &State, step: u32) -> Result<Response, Error> {
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
    let mut input_chars = agent.spec.system.chars().count();
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
    Ok(Response {
        message: Message::assistant(content, tool_calls),
        usage,
        model: model.model.clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::Router;
    use axum::http::{HeaderMap, HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use serde_json::json;

    use super::*;

    /// Headers and JSON body of each request the fake server received.
    type Seen = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

    /// Starts a real server on 127.0.0.1 answering every chat request with the
    /// given status, headers and body. Returns its base URL (with a trailing slash).
    async fn server(
        status: u16,
        headers: &[(&'static str, &'static str)],
        body: &str,
    ) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let headers = headers.to_vec();
        let body = body.to_string();
        let app = Router::new().route(
            "/v1/chat/completions",
            post(move |received: HeaderMap, text: String| {
                let record = record.clone();
                let headers = headers.clone();
                let body = body.clone();
                async move {
                    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
                    record.lock().unwrap().push((received, json));
                    let mut response =
                        (StatusCode::from_u16(status).unwrap(), body).into_response();
                    for (name, value) in headers {
                        response
                            .headers_mut()
                            .insert(name, HeaderValue::from_static(value));
                    }
                    response
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/v1/"), seen)
    }

    /// An openai agent at `base_url`; `model_extra` lines go under `model:`.
    fn agent(base_url: &str, model_extra: &str, with_tools: bool) -> Agent {
        let tools = if with_tools {
            r#"
tools:
  - name: lookup
    description: Finds an order.
    parameters: {type: object, properties: {id: {type: string}}, required: [id]}
    http: {url: "http://127.0.0.1:9/orders/{id}", method: GET}
  - name: notes
    builtin: read_file
    root: ./data
"#
        } else {
            ""
        };
        Agent::parse(&format!(
            "name: support\nversion: 1\nmodel:\n  provider: openai\n  model: gpt-test\n  base_url: {base_url}\n  timeout: 5s\n{model_extra}\nsystem: You are terse.\n{tools}"
        ))
        .unwrap()
    }

    /// A run that asked `lookup` once and got its result.
    fn conversation() -> State {
        let mut state = State::new(RunId::new());
        state.messages = vec![
            Message::user("where is order 42?"),
            Message::assistant(
                None,
                vec![ToolCall {
                    id: "call_a".into(),
                    name: "lookup".into(),
                    arguments: r#"{"id":"42"}"#.into(),
                }],
            ),
            Message::tool("call_a", "shipped"),
        ];
        state
    }

    #[tokio::test]
    async fn openai_request_and_tool_call_answer() {
        let answer = json!({
            "id": "chatcmpl-1",
            "model": "gpt-test-2026",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_x", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\":\"43\"}"}},
                {"id": "call_y", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\": 4"}}
            ]}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
        });
        let (base, seen) = server(200, &[], &answer.to_string()).await;
        let agent = agent(
            &base,
            "  api_key_env: KEEL_TEST_LLM_KEY\n  temperature: 0.2\n  max_tokens: 100",
            true,
        );
        let client = Client::new(reqwest::Client::new())
            .with_env(|name| (name == "KEEL_TEST_LLM_KEY").then(|| "sk-test-secret".to_string()));
        let state = conversation();

        let response = client.complete(&agent, &state, 2).await.unwrap();
        assert_eq!(response.model, "gpt-test-2026");
        assert_eq!(
            response.usage,
            Usage {
                input_tokens: 12,
                output_tokens: 5
            }
        );
        assert_eq!(response.message.role, Role::Assistant);
        assert_eq!(response.message.content, None);
        let calls = &response.message.tool_calls;
        assert_eq!(calls.len(), 2);
        assert_eq!(
            (calls[0].id.as_str(), calls[0].name.as_str()),
            ("call_x", "lookup")
        );
        assert_eq!(calls[0].arguments, r#"{"id":"43"}"#);
        assert_eq!(
            calls[1].arguments, r#"{"id": 4"#,
            "invalid JSON is kept verbatim"
        );

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        let (headers, body) = &seen[0];
        assert_eq!(headers["authorization"], "Bearer sk-test-secret");
        let trace = headers["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = trace.split('-').collect();
        assert_eq!(parts.len(), 4, "{trace}");
        assert_eq!(parts[0], "00");
        assert_eq!(parts[1], state.run_id.trace_id());
        assert_eq!(parts[2].len(), 16);
        assert!(
            parts[2]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(parts[2], "0000000000000000");
        assert_eq!(parts[3], "01");

        assert_eq!(body["model"], "gpt-test");
        assert_eq!(body["temperature"], 0.2);
        assert_eq!(body["max_tokens"], 100);
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 4);
        assert_eq!(
            messages[0],
            json!({"role": "system", "content": "You are terse."})
        );
        assert_eq!(
            messages[1],
            json!({"role": "user", "content": "where is order 42?"})
        );
        assert_eq!(
            messages[2],
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "lookup", "arguments": "{\"id\":\"42\"}"}}
            ]})
        );
        assert_eq!(
            messages[3],
            json!({"role": "tool", "content": "shipped", "tool_call_id": "call_a"})
        );
        let tools = body["tools"].as_array().unwrap();
        assert_eq!(tools.len(), 2);
        assert_eq!(tools[0]["type"], "function");
        assert_eq!(tools[0]["function"]["name"], "lookup");
        assert_eq!(tools[0]["function"]["description"], "Finds an order.");
        assert_eq!(
            tools[0]["function"]["parameters"]["required"],
            json!(["id"])
        );
        assert_eq!(tools[1]["function"]["name"], "notes");
        assert_eq!(
            tools[1]["function"]["parameters"]["required"],
            json!(["path"])
        );
        assert!(
            !tools[1]["function"]["description"]
                .as_str()
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn openai_lenient_answers() {
        // Null content without tool calls, no usage, no model: a plain answer.
        let (base, seen) = server(
            200,
            &[],
            r#"{"choices":[{"message":{"role":"assistant","content":"Shipped."}}]}"#,
        )
        .await;
        let client = Client::new(reqwest::Client::new());
        let plain = agent(base.trim_end_matches('/'), "", false);
        let response = client.complete(&plain, &conversation(), 2).await.unwrap();
        assert_eq!(response.message.content.as_deref(), Some("Shipped."));
        assert!(response.message.tool_calls.is_empty());
        assert_eq!(response.usage, Usage::default());
        assert_eq!(response.model, "gpt-test");
        let (headers, body) = seen.lock().unwrap()[0].clone();
        assert!(
            headers.get("authorization").is_none(),
            "no key configured, no header"
        );
        assert!(body.get("tools").is_none());
        assert!(body.get("temperature").is_none() && body.get("max_tokens").is_none());

        // Arguments as an object, missing id, content missing altogether.
        let answer = r#"{"choices":[{"message":{"role":"assistant","tool_calls":[
            {"type":"function","function":{"name":"lookup","arguments":{"id":"7"}}}]}}],
            "usage":{"prompt_tokens":3}}"#;
        let (base, _) = server(200, &[], answer).await;
        let response = client
            .complete(&agent(&base, "", true), &conversation(), 2)
            .await
            .unwrap();
        assert_eq!(response.message.content, None);
        let call = &response.message.tool_calls[0];
        assert_eq!(call.id, "call_2_0");
        assert_eq!(call.arguments, r#"{"id":"7"}"#);
        assert_eq!(
            response.usage,
            Usage {
                input_tokens: 3,
                output_tokens: 0
            }
        );

        // Null content and null tool calls.
        let (base, _) = server(
            200,
            &[],
            r#"{"choices":[{"message":{"content":null,"tool_calls":null}}]}"#,
        )
        .await;
        let response = client
            .complete(&agent(&base, "", false), &conversation(), 2)
            .await
            .unwrap();
        assert_eq!(response.message.content, None);
        assert!(response.message.tool_calls.is_empty());
    }

    #[tokio::test]
    async fn openai_errors_are_classified() {
        let client = Client::new(reqwest::Client::new()).with_env(|_| Some("sk-leaky".into()));
        let state = conversation();
        let keyed = "  api_key_env: KEEL_TEST_LLM_KEY";

        let (base, _) = server(
            429,
            &[("retry-after", "7")],
            r#"{"error":{"message":"slow down"}}"#,
        )
        .await;
        let error = client
            .complete(&agent(&base, keyed, false), &state, 2)
            .await
            .unwrap_err();
        assert!(error.is_transient());
        assert_eq!(error.retry_after(), Some(Duration::from_secs(7)));
        assert!(
            error.to_string().contains("429") && error.to_string().contains("slow down"),
            "{error}"
        );

        let (base, _) = server(500, &[], "upstream exploded").await;
        let error = client
            .complete(&agent(&base, keyed, false), &state, 2)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &error,
                Error::Transient {
                    retry_after: None,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error.to_string().contains("HTTP 500")
                && error.to_string().contains("upstream exploded")
        );

        let (base, _) = server(401, &[], "Incorrect API key provided: sk-leaky").await;
        let error = client
            .complete(&agent(&base, keyed, false), &state, 2)
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Permanent { .. }), "{error:?}");
        assert!(error.to_string().contains("401"));
        assert!(
            !error.to_string().contains("sk-leaky"),
            "the key never appears: {error}"
        );

        let (base, _) = server(200, &[], "<html>gateway says hi</html>").await;
        let error = client
            .complete(&agent(&base, keyed, false), &state, 2)
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error:?}");
        assert!(error.to_string().contains("gateway says hi"));

        let (base, _) = server(200, &[], r#"{"choices":[]}"#).await;
        let error = client
            .complete(&agent(&base, "", false), &state, 2)
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error:?}");

        // A closed port: a network error, worth retrying.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = format!("http://{}/v1", listener.local_addr().unwrap());
        drop(listener);
        let error = client
            .complete(&agent(&closed, "", false), &state, 2)
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error:?}");

        // A key variable that is not set: permanent, named, read from the real environment.
        let client = Client::new(reqwest::Client::new());
        let missing = "  api_key_env: KEEL_TEST_SURELY_UNSET_8F3A";
        let error = client
            .complete(&agent(&base, missing, false), &state, 2)
            .await
            .unwrap_err();
        assert!(matches!(error, Error::Permanent { .. }));
        assert!(
            error.to_string().contains("KEEL_TEST_SURELY_UNSET_8F3A"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn scripted_replays_the_script() {
        let agent = Agent::parse(
            r#"
name: demo
version: 1
model:
  provider: scripted
  model: scripted-demo
  script:
    - tool_calls: [{name: notes, arguments: {path: a.md}}]
    - content: "The notes say: {{tool_result}}"
system: Be brief.
tools:
  - name: notes
    builtin: read_file
    root: ./data
"#,
        )
        .unwrap();
        let client = Client::new(reqwest::Client::new());
        let mut state = State::new(RunId::new());
        state.messages.push(Message::user("summarize a.md"));

        let first = client.complete(&agent, &state, 1).await.unwrap();
        assert_eq!(first.model, "scripted-demo");
        assert_eq!(first.message.content, None);
        assert_eq!(
            first.message.tool_calls,
            vec![ToolCall {
                id: "call_1_0".into(),
                name: "notes".into(),
                arguments: r#"{"path":"a.md"}"#.into(),
            }]
        );
        assert!(first.usage.input_tokens > 0 && first.usage.output_tokens > 0);

        state.messages.push(first.message);
        state.messages.push(Message::tool("call_1_0", "buy milk"));
        let second = client.complete(&agent, &state, 2).await.unwrap();
        assert_eq!(
            second.message.content.as_deref(),
            Some("The notes say: buy milk")
        );
        assert!(second.message.tool_calls.is_empty());
        assert_eq!(
            client.complete(&agent, &state, 2).await.unwrap(),
            second,
            "deterministic"
        );

        let error = client.complete(&agent, &state, 3).await.unwrap_err();
        assert!(matches!(error, Error::Permanent { .. }));
        assert_eq!(
            error.to_string(),
            "scripted model has no turn for step 3 (script has 2 turns)"
        );
    }
}
