//! Stand-ins for the outside world, for tests, the benchmark and offline
//! demos: an OpenAI-compatible chat-completions server (a mock of the paid
//! LLM provider that speaks the real wire protocol) and an HTTP tool server
//! that counts calls per `Idempotency-Key`. Both listen on 127.0.0.1.
//!
//! The mock model's behaviour is chosen by the `model` field of the request:
//! * `tools:N` calls the first tool offered N times (`{"n": k}`), then answers;
//! * `garbage` calls tools with arguments that are not JSON or unknown tools;
//! * anything else gets a 400, like a real provider for an unknown model.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// Shared state of the mock servers, readable by tests.
#[derive(Default)]
pub struct Counters {
    /// When set, the LLM answers 503 to everything.
    pub llm_down: AtomicBool,
    /// Chat-completion requests received.
    pub llm_requests: AtomicU64,
    /// Delay before each LLM answer.
    pub llm_latency_ms: AtomicU64,
    /// Tool requests received.
    pub tool_requests: AtomicU64,
    /// Tool requests whose `traceparent` header was missing or malformed.
    pub bad_traceparents: AtomicU64,
    /// Tool requests per idempotency key.
    pub keys: Mutex<HashMap<String, u32>>,
}

impl Counters {
    /// Zeroes the request counts (not the switches: down, latency).
    pub fn reset(&self) {
        self.llm_requests.store(0, Ordering::Relaxed);
        self.tool_requests.store(0, Ordering::Relaxed);
        self.bad_traceparents.store(0, Ordering::Relaxed);
        if let Ok(mut keys) = self.keys.lock() {
            keys.clear();
        }
    }

    /// A copy of the per-key counts.
    pub fn key_counts(&self) -> HashMap<String, u32> {
        self.keys.lock().map(|k| k.clone()).unwrap_or_default()
    }
}

/// The running mock servers.
pub struct Mock {
    /// Where they listen.
    pub addr: SocketAddr,
    /// Their counters.
    pub counters: Arc<Counters>,
}

impl Mock {
    /// Starts both servers on one ephemeral port of 127.0.0.1.
    pub async fn start() -> std::io::Result<Mock> {
        let counters = Arc::new(Counters::default());
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/tools/echo", post(echo))
            .route("/tools/fail", post(fail))
            .with_state(counters.clone());
        let listener = crate::api::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "mock server stopped");
            }
        });
        Ok(Mock { addr, counters })
    }

    /// Base URL of the mock LLM (`…/v1`).
    pub fn llm_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// URL of a mock tool (`echo` or `fail`).
    pub fn tool_url(&self, name: &str) -> String {
        format!("http://{}/tools/{name}", self.addr)
    }
}

/// A valid W3C traceparent: `00-<32 hex>-<16 hex>-<2 hex>`.
pub fn is_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
}

/// The parts of a chat-completions request the mock model looks at (parsed
/// without building a JSON tree: the mock should cost as little as possible).
#[derive(serde::Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(default, borrow)]
    messages: Vec<ChatMessage<'a>>,
    #[serde(default, borrow)]
    tools: Vec<ChatTool<'a>>,
}

#[derive(serde::Deserialize)]
struct ChatMessage<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct ChatTool<'a> {
    #[serde(borrow)]
    function: ChatFunction<'a>,
}

#[derive(serde::Deserialize)]
struct ChatFunction<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

async fn chat(State(c): State<Arc<Counters>>, body: axum::body::Bytes) -> Response {
    c.llm_requests.fetch_add(1, Ordering::Relaxed);
    let latency = c.llm_latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if c.llm_down.load(Ordering::Relaxed) {
        let body =
            json!({"error": {"message": "the mock provider is down", "type": "server_error"}});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let req: ChatRequest<'_> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let body = json!({"error": {"message": format!("bad request body: {e}"), "type": "invalid_request_error"}});
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    };
    let model = req.model.as_ref();
    let tool_results = req.messages.iter().filter(|m| m.role == "tool").count();
    let tool = req
        .tools
        .first()
        .map_or("none", |t| t.function.name.as_ref());
    let prompt_tokens = body.len() / 4;

    let message = if let Some(n) = model
        .strip_prefix("tools:")
        .and_then(|n| n.parse::<usize>().ok())
    {
        if tool_results < n {
            let args = json!({"n": tool_results + 1}).to_string();
            json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": format!("call_{}", tool_results + 1), "type": "function",
                 "function": {"name": tool, "arguments": args}}]})
        } else {
            let last = req
                .messages
                .iter()
                .rev()
                .find(|m| m.role == "tool")
                .and_then(|m| m.content.as_deref())
                .unwrap_or("");
            json!({"role": "assistant", "content": format!("done after {tool_results} tool calls; last result: {last}")})
        }
    } else if model == "garbage" {
        let (name, args) = if tool_results % 2 == 0 {
            (tool, "{\"n\": oops")
        } else {
            ("no_such_tool", "{}")
        };
        json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": format!("call_{tool_results}"), "type": "function",
             "function": {"name": name, "arguments": args}}]})
    } else {
        let body = json!({"error": {"message": format!("unknown mock model `{model}`"), "type": "invalid_request_error"}});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    };
    let completion_tokens = message.to_string().len() / 4;
    let finish = if message["tool_calls"].is_array() {
        "tool_calls"
    } else {
        "stop"
    };
    Json(json!({
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}
    }))
    .into_response()
}

fn count(c: &Counters, headers: &HeaderMap) {
    c.tool_requests.fetch_add(1, Ordering::Relaxed);
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_traceparent(traceparent) {
        c.bad_traceparents.fetch_add(1, Ordering::Relaxed);
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)")
        .to_string();
    if let Ok(mut keys) = c.keys.lock() {
        *keys.entry(key).or_insert(0) += 1;
    }
}

async fn echo(
    State(c): State<Arc<Counters>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    count(&c, &headers);
    let args: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Json(json!({"echo": args})).into_response()
}

async fn fail(State(c): State<Arc<Counters>>, headers: HeaderMap) -> Response {
    count(&c, &headers);
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "the mock tool always fails",
    )
        .into_response()
}
