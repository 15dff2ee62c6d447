//! The providers over real HTTP (a local axum server per test): request
//! shapes, answers, error classification, and streams that arrive in pieces,
//! stall, or stop early.

use std::convert::Infallible;
use std::sync::Mutex;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post;
use futures_util::StreamExt;
use keel_core::message::{Role, ToolCall};
use serde_json::{Value, json};

use super::*;

/// Headers and JSON body of each request the fake server received.
type Seen = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

/// What the fake provider answers to every request: a status, headers, and
/// the body in pieces, each sent after its delay (ms); then the body ends,
/// or, when `stall`, never does.
#[derive(Clone, Default)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    pieces: Vec<(u64, Vec<u8>)>,
    stall: bool,
}

impl Reply {
    /// `body` as an event stream in pieces of `size` bytes, `delay_ms` apart.
    fn stream(body: &[u8], size: usize, delay_ms: u64) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type", "text/event-stream")],
            pieces: body.chunks(size).map(|c| (delay_ms, c.to_vec())).collect(),
            stall: false,
        }
    }
}

/// Starts a real server on 127.0.0.1 answering chat-completions and
/// messages requests with `reply`. Returns its base URL (with a trailing slash).
async fn serve(reply: Reply) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let handler = post(move |received: HeaderMap, text: String| {
        let record = record.clone();
        let reply = reply.clone();
        async move {
            let json = serde_json::from_str(&text).unwrap_or(Value::Null);
            record.lock().unwrap().push((received, json));
            let pieces = futures_util::stream::iter(reply.pieces).then(|(ms, bytes)| async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok::<_, Infallible>(Bytes::from(bytes))
            });
            let body = if reply.stall {
                Body::from_stream(pieces.chain(futures_util::stream::pending()))
            } else {
                Body::from_stream(pieces)
            };
            let mut response = (StatusCode::from_u16(reply.status).unwrap(), body).into_response();
            for (name, value) in reply.headers {
                response
                    .headers_mut()
                    .insert(name, HeaderValue::from_static(value));
            }
            response
        }
    });
    let app = Router::new()
        .route("/v1/chat/completions", handler.clone())
        .route("/v1/messages", handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1/"), seen)
}

/// A server answering every request with the given status, headers and body.
async fn server(
    status: u16,
    headers: &[(&'static str, &'static str)],
    body: &str,
) -> (String, Seen) {
    serve(Reply {
        status,
        headers: headers.to_vec(),
        pieces: vec![(0, body.as_bytes().to_vec())],
        stall: false,
    })
    .await
}

/// An openai agent at `base_url`; `model_extra` lines go under `model:`.
fn agent(base_url: &str, model_extra: &str, with_tools: bool) -> Agent {
    agent_for("openai", base_url, model_extra, with_tools)
}

/// An agent of `provider` at `base_url`; `model_extra` lines go under `model:`.
fn agent_for(provider: &str, base_url: &str, model_extra: &str, with_tools: bool) -> Agent {
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
        "name: support\nversion: 1\nmodel:\n  provider: {provider}\n  model: gpt-test\n  base_url: {base_url}\n  timeout: 5s\n{model_extra}\nsystem: You are terse.\n{tools}"
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
        error.to_string().contains("HTTP 500") && error.to_string().contains("upstream exploded")
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

#[tokio::test]
async fn scripted_streams_its_turn_as_deltas() {
    let agent = Agent::parse(
        "name: demo\nversion: 1\nmodel:\n  provider: scripted\n  model: s\n  script:\n    - {content: thinking, tool_calls: [{name: notes, arguments: {path: a.md}}]}\ntools:\n  - {name: notes, builtin: read_file, root: ./data}\n",
    )
    .unwrap();
    let client = Client::new(reqwest::Client::new());
    let state = State::new(RunId::new());
    let mut deltas = Vec::new();
    let streamed = client
        .stream(&agent, &state, 1, |d| deltas.push(d))
        .await
        .unwrap();
    assert_eq!(streamed, client.complete(&agent, &state, 1).await.unwrap());
    assert_eq!(streamed.finish, Finish::ToolCalls);
    assert_eq!(
        deltas,
        vec![
            Delta::Text("thinking".into()),
            Delta::ToolCall {
                index: 0,
                id: "call_1_0".into(),
                name: "notes".into()
            },
            Delta::ToolArguments {
                index: 0,
                fragment: r#"{"path":"a.md"}"#.into()
            },
        ]
    );
}

const ANTHROPIC_TOOL_USE_JSON: &str = include_str!("fixtures/anthropic_message_tool_use.json");
const ANTHROPIC_TOOL_USE_SSE: &[u8] = include_bytes!("fixtures/anthropic_stream_tool_use.sse");
const OPENAI_TEXT_SSE: &[u8] = include_bytes!("fixtures/openai_stream_text.sse");

/// A client whose `KEEL_TEST_LLM_KEY` is `sk-ant-secret`.
fn keyed_client() -> Client {
    Client::new(reqwest::Client::new())
        .with_env(|name| (name == "KEEL_TEST_LLM_KEY").then(|| "sk-ant-secret".to_string()))
}

#[tokio::test]
async fn anthropic_request_and_tool_use_answer() {
    let (base, seen) = server(
        200,
        &[("content-type", "application/json")],
        ANTHROPIC_TOOL_USE_JSON,
    )
    .await;
    let agent = agent_for("anthropic", &base, "  api_key_env: KEEL_TEST_LLM_KEY", true);
    let state = conversation();
    let response = keyed_client().complete(&agent, &state, 2).await.unwrap();
    assert_eq!(response.model, "claude-sonnet-4-5-20250929");
    assert_eq!(response.finish, Finish::ToolCalls);
    assert_eq!(
        response.message.content.as_deref(),
        Some("Let me look that up.")
    );
    assert_eq!(
        response.message.tool_calls[0],
        ToolCall {
            id: "toolu_01T1x1fJ34qAmk2tNTrN7Up6".into(),
            name: "lookup".into(),
            arguments: r#"{"id":"42"}"#.into(),
        }
    );
    assert_eq!(
        response.usage,
        Usage {
            input_tokens: 572,
            output_tokens: 89
        }
    );

    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(headers["x-api-key"], "sk-ant-secret");
    assert_eq!(headers["anthropic-version"], ANTHROPIC_VERSION);
    assert!(headers.get("authorization").is_none());
    assert!(headers.contains_key("traceparent"));
    assert_eq!(body["model"], "gpt-test");
    assert_eq!(
        body["max_tokens"], ANTHROPIC_MAX_TOKENS,
        "required: defaulted"
    );
    assert_eq!(body["system"], "You are terse.");
    assert!(body.get("stream").is_none() && body.get("temperature").is_none());
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "where is order 42?"}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "call_a", "name": "lookup", "input": {"id": "42"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "shipped"}
            ]}
        ])
    );
    let tools = body["tools"].as_array().unwrap();
    assert_eq!(tools.len(), 2);
    assert_eq!(
        tools[0],
        json!({"name": "lookup", "description": "Finds an order.", "input_schema":
            {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}})
    );
    assert_eq!(tools[1]["input_schema"]["required"], json!(["path"]));

    // The spec's own max_tokens and temperature; no system prompt, no key.
    let (base, seen) = server(200, &[], ANTHROPIC_TOOL_USE_JSON).await;
    let plain = Agent::parse(&format!(
        "name: s\nversion: 1\nmodel: {{provider: anthropic, model: claude-x, base_url: '{base}', max_tokens: 100, temperature: 0.5}}\n"
    ))
    .unwrap();
    keyed_client().complete(&plain, &state, 2).await.unwrap();
    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert!(headers.get("x-api-key").is_none());
    assert_eq!(
        (&body["max_tokens"], &body["temperature"]),
        (&json!(100), &json!(0.5))
    );
    assert!(body.get("system").is_none() && body.get("tools").is_none());
}

#[tokio::test]
async fn anthropic_errors_are_classified() {
    let client = keyed_client();
    let state = conversation();
    let call = |base: String| {
        let client = client.clone();
        let state = state.clone();
        async move {
            let agent = agent_for(
                "anthropic",
                &base,
                "  api_key_env: KEEL_TEST_LLM_KEY",
                false,
            );
            client.complete(&agent, &state, 2).await.unwrap_err()
        }
    };

    let overloaded =
        r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let (base, _) = server(529, &[("retry-after", "3")], overloaded).await;
    let error = call(base).await;
    assert!(error.is_transient(), "{error:?}");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(3)));
    assert!(
        error.to_string().contains("529") && error.to_string().contains("Overloaded"),
        "{error}"
    );

    let limited = r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
    let (base, _) = server(429, &[("retry-after", "12")], limited).await;
    let error = call(base).await;
    assert_eq!(error.retry_after(), Some(Duration::from_secs(12)));

    let invalid = r#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: too big"}}"#;
    let (base, _) = server(400, &[("retry-after", "5")], invalid).await;
    let error = call(base).await;
    assert!(matches!(error, Error::Permanent { .. }), "{error:?}");
    assert!(error.to_string().contains("max_tokens: too big"));

    let (base, _) = server(401, &[], "invalid x-api-key sk-ant-secret").await;
    let error = call(base).await;
    assert!(matches!(error, Error::Permanent { .. }), "{error:?}");
    assert!(
        !error.to_string().contains("sk-ant-secret") && error.to_string().contains("[redacted]"),
        "{error}"
    );

    let (base, _) = server(200, &[], overloaded).await;
    let error = call(base).await;
    assert!(error.is_transient(), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("unreadable body (missing field `content`"),
        "{error}"
    );
}

/// Streams `agent`'s answer, recording each delta with the time it came.
async fn stream_timed(
    client: &Client,
    agent: &Agent,
) -> (Result<Response, Error>, Vec<(Delta, Instant)>) {
    let mut deltas = Vec::new();
    let result = client
        .stream(agent, &conversation(), 2, |d| {
            deltas.push((d, Instant::now()))
        })
        .await;
    (result, deltas)
}

#[tokio::test]
async fn streams_arrive_piece_by_piece() {
    // OpenAI: the first half, a pause, the rest; deltas come as they arrive.
    let half = OPENAI_TEXT_SSE.len() / 2;
    let mut reply = Reply::stream(&OPENAI_TEXT_SSE[..half], 7, 0);
    reply.pieces.push((500, OPENAI_TEXT_SSE[half..].to_vec()));
    let (base, seen) = serve(reply).await;
    let agent = agent_for("openai", &base, "  api_key_env: KEEL_TEST_LLM_KEY", true);
    let (result, deltas) = stream_timed(&keyed_client(), &agent).await;
    let response = result.unwrap();
    assert_eq!(
        response.message.content.as_deref(),
        Some("Order 42 shipped — café ☕ 🚚.")
    );
    assert_eq!(response.usage.output_tokens, 9);
    assert_eq!(deltas.len(), 3);
    let first = deltas[0].1;
    let last = deltas[2].1;
    assert!(
        last - first >= Duration::from_millis(250),
        "the first delta came before the pause: {:?}",
        last - first
    );
    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(headers["authorization"], "Bearer sk-ant-secret");
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));

    // Anthropic, in pieces of 5 bytes.
    let (base, seen) = serve(Reply::stream(ANTHROPIC_TOOL_USE_SSE, 5, 0)).await;
    let agent = agent_for("anthropic", &base, "", true);
    let (result, deltas) = stream_timed(&keyed_client(), &agent).await;
    let response = result.unwrap();
    assert_eq!(response.message.tool_calls.len(), 2);
    assert_eq!(response.message.tool_calls[0].arguments, r#"{"id": "42"}"#);
    assert_eq!(response.finish, Finish::ToolCalls);
    assert_eq!(deltas.len(), 6);
    let body = seen.lock().unwrap()[0].1.clone();
    assert_eq!(body["stream"], true);
    assert!(body.get("stream_options").is_none());

    // A server that ignores `stream` and answers JSON: the answer as deltas at once.
    let (base, _) = server(
        200,
        &[("content-type", "application/json; charset=utf-8")],
        ANTHROPIC_TOOL_USE_JSON,
    )
    .await;
    let agent = agent_for("anthropic", &base, "", false);
    let (result, deltas) = stream_timed(&keyed_client(), &agent).await;
    assert_eq!(result.unwrap().message.tool_calls.len(), 2);
    let deltas: Vec<Delta> = deltas.into_iter().map(|(d, _)| d).collect();
    assert_eq!(deltas[0], Delta::Text("Let me look that up.".into()));
    assert_eq!(deltas.len(), 5);
}

#[tokio::test]
async fn stalled_cut_and_refused_streams_are_transient() {
    let client = keyed_client();

    // Stalls after the first half: the idle timeout ends it, quickly.
    let half = OPENAI_TEXT_SSE.len() / 2;
    let mut reply = Reply::stream(&OPENAI_TEXT_SSE[..half], 64, 0);
    reply.stall = true;
    let (base, _) = serve(reply).await;
    let agent = agent_for("openai", &base, "  idle_timeout: 300ms", false);
    let started = Instant::now();
    let (result, deltas) = stream_timed(&client, &agent).await;
    let error = result.unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    assert_eq!(
        error.to_string(),
        "LLM stream stalled: nothing received for 300ms"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        !deltas.is_empty(),
        "what came before the stall was delivered"
    );

    // The client's idle timeout applies when the spec sets none.
    let mut reply = Reply::stream(b"data: {\"choices\":[]}\n\n", 64, 0);
    reply.stall = true;
    let (base, _) = serve(reply).await;
    let quick = client.clone().with_idle_timeout(Duration::from_millis(200));
    let (result, _) = stream_timed(&quick, &agent_for("openai", &base, "", false)).await;
    assert_eq!(
        result.unwrap_err().to_string(),
        "LLM stream stalled: nothing received for 200ms"
    );

    // Keeps sending pings but never answers: the call's timeout ends it.
    let mut reply = Reply::stream(b"", 1, 0);
    reply.pieces = (0..40).map(|_| (100, b": ping\n\n".to_vec())).collect();
    reply.stall = true;
    let (base, _) = serve(reply).await;
    let agent = with_timeout(
        &agent_for("anthropic", &base, "  idle_timeout: 800ms", false),
        "1s",
    );
    let started = Instant::now();
    let (result, _) = stream_timed(&client, &agent).await;
    let error = result.unwrap_err();
    assert_eq!(error.to_string(), "LLM call timed out after 1s");
    assert!(started.elapsed() < Duration::from_secs(3));

    // Closes before the end marker.
    let done = OPENAI_TEXT_SSE.len() - "data: [DONE]\n\n".len();
    let (base, _) = serve(Reply::stream(&OPENAI_TEXT_SSE[..done], 100, 0)).await;
    let (result, deltas) = stream_timed(&client, &agent_for("openai", &base, "", false)).await;
    let error = result.unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    assert!(
        error.to_string().contains("ended before `data: [DONE]`"),
        "{error}"
    );
    assert_eq!(deltas.len(), 3);

    // Refused before streaming: classified like any call.
    let (base, _) = server(429, &[("retry-after", "4")], "slow down").await;
    let (result, deltas) = stream_timed(&client, &agent_for("anthropic", &base, "", false)).await;
    let error = result.unwrap_err();
    assert_eq!(error.retry_after(), Some(Duration::from_secs(4)));
    assert!(deltas.is_empty());
}

/// `agent` with `model.timeout` set to `timeout`.
fn with_timeout(agent: &Agent, timeout: &str) -> Agent {
    let mut spec = serde_json::to_value(&agent.spec).unwrap();
    spec["model"]["timeout"] = json!(timeout);
    Agent::from_value(spec).unwrap()
}

#[test]
fn calls_can_move_between_worker_threads() {
    fn send<T: Send>(_: &T) {}
    let client = Client::new(reqwest::Client::new());
    let agent = agent("http://127.0.0.1:9/v1", "", false);
    let state = conversation();
    send(&client.complete(&agent, &state, 1));
    let mut deltas = Vec::new();
    send(&client.stream(&agent, &state, 1, |d| deltas.push(d)));
}
