//! Stand-ins for the outside world, for tests, the benchmark and offline
//! demos: a mock of the paid LLM provider that speaks the real wire protocols
//! (OpenAI-compatible chat completions at `POST /v1/chat/completions` and the
//! Anthropic Messages API at `POST /v1/messages`, each plain or streamed as
//! Server-Sent Events when the request says `"stream": true`) and an HTTP tool
//! server that counts calls per `Idempotency-Key`. Both listen on 127.0.0.1.
//!
//! The mock model's behaviour is chosen by the `model` field of the request:
//! * `tools:N` calls the first tool offered N times (`{"n": k}`), then answers;
//! * `garbage` calls tools with arguments that are not JSON or unknown tools
//!   (a plain Anthropic answer can only hold a JSON object, so there the bad
//!   arguments become a call to an unknown tool);
//! * `absurd` first says something holding U+0000 and calls tools with an
//!   empty id, an id used twice, an empty name and arguments that are a
//!   NUL, then answers with 1 MB of text holding U+0000;
//! * `long:N:MS` answers at once with a text of N words (`w1 w2 …`); streamed,
//!   each word is its own chunk, sent MS milliseconds after the previous one
//!   (a slow model, for tests of streaming that survives reconnects);
//! * `plan:K:MS` first says what it will do (a few words), then calls the
//!   first tool K times in one answer (parallel calls `call_1`…`call_K`,
//!   arguments `{"n": k, "note": …}`), then answers once the results are in;
//!   streamed, the arguments come in pieces of 4 bytes and every chunk MS
//!   milliseconds after the previous one (tool calls being built, for tests
//!   of streamed tool calls);
//! * `refuse:STATUS` answers with that HTTP status and an error that quotes
//!   the request's credentials (`Authorization`, `x-api-key`) and its start,
//!   like a careless provider or proxy (for tests that keys stay out of
//!   errors);
//! * anything else gets a 400 (OpenAI) or 404 (Anthropic), like a real
//!   provider for an unknown model.
//!
//! The tool server also has `/tools/mirror` (any method: answers the
//! request's method, URI and headers as JSON, with the status of its
//! `status` query parameter, 200 by default; each request is kept, see
//! [`Counters::mirrored`]) and `/tools/redirect` (307 to its `to` query
//! parameter).
//!
//! Streamed answers split text at spaces and tool arguments in two (in
//! pieces of 4 bytes for `plan`), in each protocol's own framing (OpenAI:
//! `delta.tool_calls[]` by index, the id and name first with empty
//! arguments; Anthropic: a `text` block, then one `tool_use` block per call
//! with `input_json_delta`s), so clients see several deltas; the plain OpenAI
//! answer is the benchmark's hot path and stays one `json!` value.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Shared state of the mock servers, readable by tests.
#[derive(Default)]
pub struct Counters {
    /// When set, the LLM answers 503 to everything.
    pub llm_down: AtomicBool,
    /// LLM requests received (chat completions and messages).
    pub llm_requests: AtomicU64,
    /// Delay before each LLM answer.
    pub llm_latency_ms: AtomicU64,
    /// Tool requests received.
    pub tool_requests: AtomicU64,
    /// Tool requests whose `traceparent` header was missing or malformed.
    pub bad_traceparents: AtomicU64,
    /// When on (`track_traceparents`), each tool request's idempotency key
    /// and `traceparent` header, in arrival order; chat completions' under
    /// the key `llm`.
    pub traceparents: Mutex<Option<Vec<(String, String)>>>,
    /// Tool requests per idempotency key.
    pub keys: Mutex<HashMap<String, u32>>,
    /// When set (`limit_llm`), the LLM accepts at most this many requests
    /// in any window of this length and answers 429 with `Retry-After` above.
    pub llm_rate: Mutex<Option<(usize, Duration)>>,
    /// Arrival times of the LLM requests accepted while a rate is set.
    pub llm_accepted: Mutex<Vec<Instant>>,
    /// Arrival times of every LLM request, accepted or refused: what the
    /// provider saw.
    pub llm_arrivals: Mutex<Vec<Instant>>,
    /// The next this many LLM requests are answered 429 with `Retry-After:
    /// llm_refusal_after` (`refuse_llm`).
    pub llm_refusals: AtomicU64,
    /// The `Retry-After` of those refusals, in seconds.
    pub llm_refusal_after: AtomicU64,
    /// LLM requests refused with 429.
    pub llm_throttled: AtomicU64,
    /// The `Authorization` header of the latest chat-completions request.
    pub llm_auth: Mutex<Option<String>>,
    /// When on (`track_tokens`), each chat completion's arrival time and
    /// tokens (prompt + completion, as the mock counts them), refused ones
    /// (`limit_llm_tokens`) too.
    pub llm_tokens: Mutex<Option<Vec<(Instant, u64)>>>,
    /// When set (`limit_llm_tokens`), plain chat completions may use at
    /// most this many tokens in any window of this length; one that would
    /// go over is answered 429 with `Retry-After`.
    pub llm_token_rate: Mutex<Option<(u64, Duration)>>,
    /// The arrival times and tokens of the chat completions accepted while
    /// a token rate is set.
    pub llm_tokens_accepted: Mutex<Vec<(Instant, u64)>>,
    /// When on (`track_tools`), the names of the tools the latest chat
    /// completion offered the model.
    pub llm_tools: Mutex<Option<Vec<String>>>,
    /// Webhook notifications received at `/hooks/{name}`, in arrival order.
    pub hooks: Mutex<Vec<Hook>>,
    /// When set, `/hooks/{name}` answers 503 (and records nothing).
    pub hooks_down: AtomicBool,
    /// Webhook requests refused while `hooks_down`.
    pub hooks_refused: AtomicU64,
    /// Percent of chat completions answered with a fault chosen at random:
    /// a 500, a 429 with `Retry-After: 1`, a 200 whose JSON body is cut
    /// short, or a 200 whose connection drops mid-body.
    pub llm_faults: AtomicU64,
    /// Chat completions answered with a fault.
    pub llm_faulted: AtomicU64,
    /// Percent of `echo` tool requests answered 500 or 503 (after they are
    /// counted: the server saw the key, as a real one that failed late would).
    pub tool_faults: AtomicU64,
    /// Tool requests answered with a fault.
    pub tool_faulted: AtomicU64,
    /// When on (`track_bodies`), the body of every LLM request (chat
    /// completions and messages), in arrival order: what the model was told.
    pub llm_bodies: Mutex<Option<Vec<String>>>,
    /// What `/tools/mirror` answered, one JSON text per request.
    pub mirrored: Mutex<Vec<String>>,
}

/// A fault for `percent` of the requests (`llm_faults`): None for the rest.
fn llm_fault(c: &Counters) -> Option<Response> {
    let percent = c.llm_faults.load(Ordering::Relaxed);
    if percent == 0 || fastrand::u64(0..100) >= percent {
        return None;
    }
    c.llm_faulted.fetch_add(1, Ordering::Relaxed);
    let json = [(header::CONTENT_TYPE, "application/json")];
    Some(match fastrand::u8(0..8) {
        0..=2 => {
            let body =
                json!({"error": {"message": "the mock provider failed", "type": "server_error"}});
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
        3 => {
            let body =
                json!({"error": {"message": "rate limit reached", "type": "rate_limit_error"}});
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                Json(body),
            )
                .into_response()
        }
        4 | 5 => (
            StatusCode::OK,
            json,
            r#"{"id": "chatcmpl-mock", "choices": [{"#,
        )
            .into_response(),
        _ => {
            let pieces = futures_util::stream::iter([
                Ok(axum::body::Bytes::from_static(
                    br#"{"id": "chatcmpl-mock", "#,
                )),
                Err(std::io::Error::other("the mock dropped the connection")),
            ]);
            (StatusCode::OK, json, Body::from_stream(pieces)).into_response()
        }
    })
}

/// A webhook notification the mock received.
#[derive(Clone, Debug)]
pub struct Hook {
    /// The last path segment it was POSTed to.
    pub name: String,
    /// Its `Keel-Event` header.
    pub event: Option<String>,
    /// Its `Keel-Signature` header.
    pub signature: Option<String>,
    /// Its `Keel-Delivery` header.
    pub delivery: Option<String>,
    /// The raw body.
    pub body: String,
}

impl Counters {
    /// Zeroes the request counts (not the switches: down, latency, rate).
    pub fn reset(&self) {
        self.llm_requests.store(0, Ordering::Relaxed);
        self.llm_throttled.store(0, Ordering::Relaxed);
        if let Ok(mut accepted) = self.llm_accepted.lock() {
            accepted.clear();
        }
        if let Ok(mut arrivals) = self.llm_arrivals.lock() {
            arrivals.clear();
        }
        if let Ok(mut accepted) = self.llm_tokens_accepted.lock() {
            accepted.clear();
        }
        self.tool_requests.store(0, Ordering::Relaxed);
        self.bad_traceparents.store(0, Ordering::Relaxed);
        if let Ok(mut keys) = self.keys.lock() {
            keys.clear();
        }
    }

    /// Makes the LLM a rate-limited provider: at most `limit` requests in
    /// any `window` (sliding), 429 with `Retry-After` above.
    pub fn limit_llm(&self, limit: usize, window: Duration) {
        if let Ok(mut rate) = self.llm_rate.lock() {
            *rate = Some((limit, window));
        }
    }

    /// Makes the LLM a provider limited in tokens: plain chat completions
    /// may use at most `limit` tokens (prompt + completion, as the mock
    /// counts them) in any `window` (sliding), 429 with `Retry-After`
    /// above (counted in `llm_throttled`).
    pub fn limit_llm_tokens(&self, limit: u64, window: Duration) {
        if let Ok(mut rate) = self.llm_token_rate.lock() {
            *rate = Some((limit, window));
        }
    }

    /// Logs a chat completion's tokens when `track_tokens` is on; the 429
    /// answer when they go over the token rate, recording them otherwise.
    fn throttle_tokens(&self, arrived: Instant, tokens: u64) -> Option<Response> {
        if let Ok(mut log) = self.llm_tokens.lock()
            && let Some(log) = log.as_mut()
        {
            log.push((arrived, tokens));
        }
        let (limit, window) = (*self.llm_token_rate.lock().ok()?)?;
        let mut accepted = self.llm_tokens_accepted.lock().ok()?;
        // Requests are checked a little after they arrive, not always in
        // their order: every accepted one that arrived less than a window
        // before this one counts (later ones too).
        let in_window = |(t, _): &&(Instant, u64)| {
            arrived
                .checked_duration_since(*t)
                .is_none_or(|d| d < window)
        };
        let used: u64 = accepted.iter().filter(in_window).map(|(_, n)| n).sum();
        if used + tokens <= limit {
            accepted.push((arrived, tokens));
            return None;
        }
        self.llm_throttled.fetch_add(1, Ordering::Relaxed);
        // Free again once the oldest tokens of the window leave it (at
        // most a window from now).
        let oldest = accepted
            .iter()
            .filter(in_window)
            .map(|(t, _)| *t)
            .min()
            .unwrap_or(arrived);
        let wait = window.saturating_sub(arrived.saturating_duration_since(oldest));
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let body =
            json!({"error": {"message": "token rate limit reached", "type": "rate_limit_error"}});
        Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, seconds.max(1).to_string())],
                Json(body),
            )
                .into_response(),
        )
    }

    /// Starts logging each chat completion's arrival time and tokens.
    pub fn track_tokens(&self) {
        if let Ok(mut log) = self.llm_tokens.lock() {
            *log = Some(Vec::new());
        }
    }

    /// The token log, by arrival time (empty unless `track_tokens`).
    pub fn token_log(&self) -> Vec<(Instant, u64)> {
        let mut log = self
            .llm_tokens
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or_default();
        log.sort_by_key(|(t, _)| *t);
        log
    }

    /// Starts keeping the tool names each chat completion offers.
    pub fn track_tools(&self) {
        if let Ok(mut tools) = self.llm_tools.lock() {
            *tools = Some(Vec::new());
        }
    }

    /// The tools the latest chat completion offered (empty unless `track_tools`).
    pub fn offered_tools(&self) -> Vec<String> {
        self.llm_tools
            .lock()
            .ok()
            .and_then(|t| t.clone())
            .unwrap_or_default()
    }

    /// Starts keeping each tool request's idempotency key and traceparent.
    pub fn track_traceparents(&self) {
        if let Ok(mut seen) = self.traceparents.lock() {
            *seen = Some(Vec::new());
        }
    }

    /// The (idempotency key, traceparent) of each tool request received,
    /// `("llm", traceparent)` of each chat completion (empty unless
    /// `track_traceparents`).
    pub fn traceparents(&self) -> Vec<(String, String)> {
        self.traceparents
            .lock()
            .ok()
            .and_then(|seen| seen.clone())
            .unwrap_or_default()
    }

    /// Starts keeping the body of every LLM request.
    pub fn track_bodies(&self) {
        if let Ok(mut bodies) = self.llm_bodies.lock() {
            *bodies = Some(Vec::new());
        }
    }

    /// The LLM request bodies received (empty unless `track_bodies`).
    pub fn llm_bodies(&self) -> Vec<String> {
        self.llm_bodies
            .lock()
            .ok()
            .and_then(|b| b.clone())
            .unwrap_or_default()
    }

    /// Keeps an LLM request body when `track_bodies` is on.
    fn keep_body(&self, body: &[u8]) {
        if let Ok(mut bodies) = self.llm_bodies.lock()
            && let Some(bodies) = bodies.as_mut()
        {
            bodies.push(String::from_utf8_lossy(body).into_owned());
        }
    }

    /// What `/tools/mirror` answered so far.
    pub fn mirrored(&self) -> Vec<String> {
        self.mirrored.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// The `Authorization` header of the latest chat-completions request.
    pub fn llm_authorization(&self) -> Option<String> {
        self.llm_auth.lock().ok().and_then(|a| a.clone())
    }

    /// Arrival times of the accepted LLM requests, oldest first.
    pub fn llm_accepted(&self) -> Vec<Instant> {
        self.llm_accepted
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Answers the next `n` LLM requests 429 with `Retry-After: seconds`
    /// (counted in `llm_throttled`).
    pub fn refuse_llm(&self, n: u64, seconds: u64) {
        self.llm_refusal_after.store(seconds, Ordering::Relaxed);
        self.llm_refusals.store(n, Ordering::Relaxed);
    }

    /// Arrival times of every LLM request received (accepted and
    /// refused), oldest first.
    pub fn llm_arrivals(&self) -> Vec<Instant> {
        self.llm_arrivals
            .lock()
            .map(|a| a.clone())
            .unwrap_or_default()
    }

    /// Records the arrival of an LLM request; the 429 answer when it is one
    /// of the refusals asked for (`refuse_llm`) or goes over the rate
    /// (`limit_llm`), which records it as accepted otherwise.
    fn throttle(&self) -> Option<Response> {
        let now = Instant::now();
        if let Ok(mut arrivals) = self.llm_arrivals.lock() {
            arrivals.push(now);
        }
        let refuse = self
            .llm_refusals
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if refuse.is_ok() {
            self.llm_throttled.fetch_add(1, Ordering::Relaxed);
            let seconds = self.llm_refusal_after.load(Ordering::Relaxed);
            let body =
                json!({"error": {"message": "rate limit reached", "type": "rate_limit_error"}});
            return Some(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, seconds.to_string())],
                    Json(body),
                )
                    .into_response(),
            );
        }
        let (limit, window) = (*self.llm_rate.lock().ok()?)?;
        let mut accepted = self.llm_accepted.lock().ok()?;
        let in_window = accepted
            .iter()
            .rev()
            .take_while(|t| now.duration_since(**t) < window)
            .count();
        if in_window < limit {
            accepted.push(now);
            return None;
        }
        self.llm_throttled.fetch_add(1, Ordering::Relaxed);
        // Free again once the oldest request of the window leaves it.
        let oldest = accepted
            .get(accepted.len() - in_window)
            .copied()
            .unwrap_or(now);
        let wait = window.saturating_sub(now.duration_since(oldest));
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let body = json!({"error": {"message": "rate limit reached", "type": "rate_limit_error"}});
        Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, seconds.max(1).to_string())],
                Json(body),
            )
                .into_response(),
        )
    }

    /// The webhook notifications received so far.
    pub fn hooks(&self) -> Vec<Hook> {
        self.hooks.lock().map(|h| h.clone()).unwrap_or_default()
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
            .route("/v1/messages", post(messages))
            .route("/tools/echo", post(echo))
            .route("/tools/fail", post(fail))
            .route("/tools/hang", post(hang))
            .route("/tools/mirror", any(mirror))
            .route("/tools/redirect", any(redirect))
            .route("/hooks/{name}", post(hook))
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

    /// Base URL of the mock LLM (`…/v1`), for `provider: openai` and `provider: anthropic`.
    pub fn llm_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// URL of the mock webhook receiver `name` (see [`Counters::hooks`]).
    pub fn hook_url(&self, name: &str) -> String {
        format!("http://{}/hooks/{name}", self.addr)
    }

    /// URL of a mock tool: `echo`, `fail`, `hang` (the first call with
    /// an idempotency key never answers; later ones echo), `mirror` or
    /// `redirect` (see the module docs).
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
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(serde::Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
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

/// What the mock model does next.
enum Turn<'a> {
    /// Says `text` (may be empty), then makes the tool calls.
    Calls { text: String, calls: Vec<Call<'a>> },
    /// Answers with text.
    Answer(String),
}

/// One tool call of a turn.
struct Call<'a> {
    id: String,
    tool: &'a str,
    /// Raw text: not always JSON.
    arguments: String,
}

impl<'a> Turn<'a> {
    /// A turn with one call and no text.
    fn call(id: String, tool: &'a str, arguments: String) -> Turn<'a> {
        Turn::Calls {
            text: String::new(),
            calls: vec![Call {
                id,
                tool,
                arguments,
            }],
        }
    }

    /// Bytes the model wrote (for the usage it reports).
    fn written(&self) -> usize {
        match self {
            Turn::Answer(text) => text.len(),
            Turn::Calls { text, calls } => {
                text.len()
                    + calls
                        .iter()
                        .map(|c| c.tool.len() + c.arguments.len())
                        .sum::<usize>()
            }
        }
    }
}

/// The next turn of mock model `model`, given the tool results so far, the
/// first tool offered and the latest result; `None` for an unknown model.
fn next_turn<'a>(model: &str, tool_results: usize, tool: &'a str, last: &str) -> Option<Turn<'a>> {
    if let Some(n) = model
        .strip_prefix("tools:")
        .and_then(|n| n.parse::<usize>().ok())
    {
        return Some(if tool_results < n {
            Turn::call(
                format!("call_{}", tool_results + 1),
                tool,
                json!({"n": tool_results + 1}).to_string(),
            )
        } else {
            Turn::Answer(format!(
                "done after {tool_results} tool calls; last result: {last}"
            ))
        });
    }
    if let Some((words, _)) = long(model) {
        let text: Vec<String> = (1..=words).map(|i| format!("w{i}")).collect();
        return Some(Turn::Answer(text.join(" ")));
    }
    if let Some((calls, _)) = plan(model) {
        if tool_results >= calls {
            return Some(Turn::Answer(format!(
                "done after {tool_results} tool calls; last result: {last}"
            )));
        }
        let calls = (1..=calls)
            .map(|k| Call {
                id: format!("call_{k}"),
                tool,
                arguments: json!({"n": k, "note": format!("call number {k} of the plan")})
                    .to_string(),
            })
            .collect();
        return Some(Turn::Calls {
            text: format!("I will call {tool} now. "),
            calls,
        });
    }
    if model == "absurd" {
        if tool_results > 0 {
            return Some(Turn::Answer(format!(
                "nul \u{0} then {}",
                "w ".repeat(512 * 1024)
            )));
        }
        let call = |id: &str, tool: &'a str, arguments: &str| Call {
            id: id.to_string(),
            tool,
            arguments: arguments.to_string(),
        };
        return Some(Turn::Calls {
            text: "thinking \u{0} aloud".to_string(),
            calls: vec![
                call("", tool, r#"{"n": 1}"#),
                call("dup", tool, r#"{"n": 2}"#),
                call("dup", "", "\u{0}"),
            ],
        });
    }
    if model == "garbage" {
        let (tool, arguments) = if tool_results.is_multiple_of(2) {
            (tool, "{\"n\": oops")
        } else {
            ("no_such_tool", "{}")
        };
        return Some(Turn::call(
            format!("call_{tool_results}"),
            tool,
            arguments.to_string(),
        ));
    }
    None
}

/// The status a `refuse:STATUS` model answers with.
fn refusal(model: &str) -> Option<StatusCode> {
    let status = model.strip_prefix("refuse:")?.parse().ok()?;
    StatusCode::from_u16(status).ok()
}

/// An error message quoting what a request was sent with: its credentials
/// headers and the start of its body.
fn quote_credentials(headers: &HeaderMap, body: &[u8]) -> String {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string()
    };
    let start = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
    format!(
        "refused: authorization `{}`, x-api-key `{}`, request `{start}`",
        header("authorization"),
        header("x-api-key")
    )
}

/// The words and the pause between streamed chunks of a `long:N:MS` model.
fn long(model: &str) -> Option<(usize, Duration)> {
    count_and_pause(model.strip_prefix("long:")?)
}

/// The calls and the pause between streamed chunks of a `plan:K:MS` model.
fn plan(model: &str) -> Option<(usize, Duration)> {
    count_and_pause(model.strip_prefix("plan:")?)
}

/// The pause between streamed chunks of a paced model, if it is one.
fn pace(model: &str) -> Option<Duration> {
    long(model).or_else(|| plan(model)).map(|(_, pause)| pause)
}

/// `N:MS` of a paced model's name.
fn count_and_pause(spec: &str) -> Option<(usize, Duration)> {
    let mut parts = spec.split(':');
    let words = parts.next()?.parse().ok()?;
    let pause = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((words, Duration::from_millis(pause)))
}

async fn chat(
    State(c): State<Arc<Counters>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let arrived = Instant::now();
    c.llm_requests.fetch_add(1, Ordering::Relaxed);
    if let Some(auth) = headers.get(header::AUTHORIZATION)
        && let Ok(mut last) = c.llm_auth.lock()
    {
        *last = auth.to_str().ok().map(str::to_string);
    }
    if let Ok(mut seen) = c.traceparents.lock()
        && let Some(seen) = seen.as_mut()
    {
        let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
        seen.push(("llm".into(), traceparent.unwrap_or("").to_string()));
    }
    if let Some(refused) = c.throttle() {
        return refused;
    }
    if let Some(fault) = llm_fault(&c) {
        return fault;
    }
    let latency = c.llm_latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if c.llm_down.load(Ordering::Relaxed) {
        let body =
            json!({"error": {"message": "the mock provider is down", "type": "server_error"}});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    c.keep_body(&body);
    let req: ChatRequest<'_> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let body = json!({"error": {"message": format!("bad request body: {e}"), "type": "invalid_request_error"}});
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    };
    if let Some(status) = refusal(&req.model) {
        let body = json!({"error": {"message": quote_credentials(&headers, &body), "type": "invalid_request_error"}});
        return (status, Json(body)).into_response();
    }
    if let Ok(mut offered) = c.llm_tools.lock()
        && let Some(offered) = offered.as_mut()
    {
        *offered = req
            .tools
            .iter()
            .map(|t| t.function.name.to_string())
            .collect();
    }
    let model = req.model.as_ref();
    let tool_results = req.messages.iter().filter(|m| m.role == "tool").count();
    let tool = req
        .tools
        .first()
        .map_or("none", |t| t.function.name.as_ref());
    let last = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "tool")
        .and_then(|m| m.content.as_deref())
        .unwrap_or("");
    let prompt_tokens = body.len() / 4;
    let Some(turn) = next_turn(model, tool_results, tool, last) else {
        let body = json!({"error": {"message": format!("unknown mock model `{model}`"), "type": "invalid_request_error"}});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    };
    if req.stream {
        let usage = req.stream_options.is_some_and(|o| o.include_usage);
        return chat_stream(model, &turn, usage.then_some(prompt_tokens), pace(model));
    }

    let message = match &turn {
        Turn::Calls { text, calls } => {
            let calls: Vec<Value> = calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                    "function": {"name": c.tool, "arguments": c.arguments}})
                })
                .collect();
            let content = (!text.is_empty()).then_some(text);
            json!({"role": "assistant", "content": content, "tool_calls": calls})
        }
        Turn::Answer(text) => json!({"role": "assistant", "content": text}),
    };
    let completion_tokens = message.to_string().len() / 4;
    if let Some(refused) = c.throttle_tokens(arrived, (prompt_tokens + completion_tokens) as u64) {
        return refused;
    }
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

/// A streamed chat completion: role, then text split at spaces, then each
/// call (its index, id and name, then its arguments in pieces), the finish
/// reason, the usage when asked (`prompt_tokens`), and `[DONE]`; with a
/// `pause`, each chunk after it.
fn chat_stream(
    model: &str,
    turn: &Turn<'_>,
    prompt_tokens: Option<usize>,
    pause: Option<Duration>,
) -> Response {
    let chunk = |delta: Value, finish: Option<&str>| {
        let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {chunk}\n\n")
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
    let (text, calls, finish) = match turn {
        Turn::Answer(text) => (text, &[][..], "stop"),
        Turn::Calls { text, calls } => (text, &calls[..], "tool_calls"),
    };
    for piece in text.split_inclusive(' ') {
        events.push(chunk(json!({"content": piece}), None));
    }
    for (index, call) in calls.iter().enumerate() {
        events.push(chunk(
            json!({"tool_calls": [{"index": index, "id": call.id, "type": "function",
                "function": {"name": call.tool, "arguments": ""}}]}),
            None,
        ));
        for piece in argument_pieces(model, &call.arguments) {
            events.push(chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                None,
            ));
        }
    }
    let written = turn.written();
    events.push(chunk(json!({}), Some(finish)));
    if let Some(prompt_tokens) = prompt_tokens {
        let completion_tokens = written.div_ceil(4);
        let usage = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
            "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}});
        events.push(format!("data: {usage}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_string());
    match pause {
        Some(pause) => paced_event_stream(events, pause),
        None => event_stream(events),
    }
}

/// A `text/event-stream` answer sending each event after `pause`.
fn paced_event_stream(events: Vec<String>, pause: Duration) -> Response {
    let frames = futures_util::stream::iter(events).then(move |event| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, Infallible>(event)
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

/// A call's arguments as a stream sends them: in pieces of 4 bytes for
/// `plan` models, else in two.
fn argument_pieces<'a>(model: &str, arguments: &'a str) -> Vec<&'a str> {
    if plan(model).is_none() {
        return halves(arguments);
    }
    let mut pieces = Vec::new();
    let mut rest = arguments;
    while !rest.is_empty() {
        let mut end = rest.len().min(4);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        let (piece, tail) = rest.split_at(end);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// `text` in two pieces split near its middle (one when it is too short).
fn halves(text: &str) -> Vec<&str> {
    let mut middle = text.len() / 2;
    while !text.is_char_boundary(middle) {
        middle -= 1;
    }
    let (a, b) = text.split_at(middle);
    [a, b].into_iter().filter(|p| !p.is_empty()).collect()
}

/// A `text/event-stream` answer sending each event as its own body frame.
fn event_stream(events: Vec<String>) -> Response {
    let frames = futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

/// The parts of a Messages API request the mock model looks at.
#[derive(serde::Deserialize)]
struct MessagesRequest<'a> {
    #[serde(borrow)]
    model: Cow<'a, str>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    messages: Vec<AnthropicMessage>,
    #[serde(default, borrow)]
    tools: Vec<AnthropicTool<'a>>,
    #[serde(default)]
    stream: bool,
}

#[derive(serde::Deserialize)]
struct AnthropicMessage {
    role: String,
    /// Text, or content blocks.
    #[serde(default)]
    content: Value,
}

#[derive(serde::Deserialize)]
struct AnthropicTool<'a> {
    #[serde(borrow)]
    name: Cow<'a, str>,
}

/// An Anthropic error body.
fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, Json(body)).into_response()
}

async fn messages(
    State(c): State<Arc<Counters>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    c.llm_requests.fetch_add(1, Ordering::Relaxed);
    if let Some(refused) = c.throttle() {
        return refused;
    }
    if let Some(fault) = llm_fault(&c) {
        return fault;
    }
    let latency = c.llm_latency_ms.load(Ordering::Relaxed);
    if latency > 0 {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    if c.llm_down.load(Ordering::Relaxed) {
        return anthropic_error(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            "Overloaded",
        );
    }
    let bad = |message: String| {
        anthropic_error(StatusCode::BAD_REQUEST, "invalid_request_error", &message)
    };
    if !headers.contains_key("anthropic-version") {
        return bad("anthropic-version: header is required".into());
    }
    c.keep_body(&body);
    let req: MessagesRequest<'_> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad(format!("bad request body: {e}")),
    };
    if let Some(status) = refusal(&req.model) {
        return anthropic_error(status, "api_error", &quote_credentials(&headers, &body));
    }
    if req.max_tokens.is_none() {
        return bad("max_tokens: Field required".into());
    }
    let model = req.model.as_ref();
    let mut tool_results = 0;
    let mut last = String::new();
    for message in req.messages.iter().filter(|m| m.role == "user") {
        let Some(blocks) = message.content.as_array() else {
            continue;
        };
        for block in blocks.iter().filter(|b| b["type"] == "tool_result") {
            tool_results += 1;
            last = match &block["content"] {
                Value::String(text) => text.clone(),
                Value::Array(parts) => parts.iter().filter_map(|p| p["text"].as_str()).collect(),
                _ => String::new(),
            };
        }
    }
    let tool = req.tools.first().map_or("none", |t| t.name.as_ref());
    let input_tokens = body.len() / 4;
    let Some(turn) = next_turn(model, tool_results, tool, &last) else {
        return anthropic_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("model: {model}"),
        );
    };
    if req.stream {
        return messages_stream(model, &turn, input_tokens, pace(model));
    }

    let (blocks, stop) = match &turn {
        Turn::Answer(text) => (vec![json!({"type": "text", "text": text})], "end_turn"),
        Turn::Calls { text, calls } => {
            let mut blocks = Vec::new();
            if !text.is_empty() {
                blocks.push(json!({"type": "text", "text": text}));
            }
            for call in calls {
                // Only an object fits in `input`: bad arguments become a bad tool.
                let (tool, input) = match serde_json::from_str::<Value>(&call.arguments) {
                    Ok(input @ Value::Object(_)) => (call.tool, input),
                    _ => ("no_such_tool", json!({})),
                };
                blocks
                    .push(json!({"type": "tool_use", "id": call.id, "name": tool, "input": input}));
            }
            (blocks, "tool_use")
        }
    };
    let written = turn.written();
    Json(json!({
        "id": "msg_mock",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": {"input_tokens": input_tokens, "output_tokens": written.div_ceil(4)}
    }))
    .into_response()
}

/// A streamed Messages API answer: `message_start`, a `ping`, a text block
/// (split at spaces) when there is text, a `tool_use` block per call (its
/// input JSON in pieces), `message_delta` and `message_stop`; with a
/// `pause`, each event after it.
fn messages_stream(
    model: &str,
    turn: &Turn<'_>,
    input_tokens: usize,
    pause: Option<Duration>,
) -> Response {
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message",
                "role": "assistant", "content": [], "model": model, "stop_reason": null,
                "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    let delta = |index: usize, delta: Value| {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    };
    let stop_block = |index: usize| {
        event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        )
    };
    let (text, calls, stop) = match turn {
        Turn::Answer(text) => (text, &[][..], "end_turn"),
        Turn::Calls { text, calls } => (text, &calls[..], "tool_use"),
    };
    let mut index = 0;
    if !text.is_empty() || calls.is_empty() {
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}),
        ));
        for piece in text.split_inclusive(' ') {
            events.push(delta(index, json!({"type": "text_delta", "text": piece})));
        }
        events.push(stop_block(index));
        index += 1;
    }
    for call in calls {
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "tool_use", "id": call.id, "name": call.tool, "input": {}}}),
        ));
        events.push(delta(
            index,
            json!({"type": "input_json_delta", "partial_json": ""}),
        ));
        for piece in argument_pieces(model, &call.arguments) {
            events.push(delta(
                index,
                json!({"type": "input_json_delta", "partial_json": piece}),
            ));
        }
        events.push(stop_block(index));
        index += 1;
    }
    let written = turn.written();
    events.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
            "usage": {"output_tokens": written.div_ceil(4)}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    match pause {
        Some(pause) => paced_event_stream(events, pause),
        None => event_stream(events),
    }
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
    if let Ok(mut seen) = c.traceparents.lock()
        && let Some(seen) = seen.as_mut()
    {
        seen.push((key.clone(), traceparent.to_string()));
    }
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
    let percent = c.tool_faults.load(Ordering::Relaxed);
    if percent > 0 && fastrand::u64(0..100) < percent {
        c.tool_faulted.fetch_add(1, Ordering::Relaxed);
        return match fastrand::bool() {
            true => (StatusCode::INTERNAL_SERVER_ERROR, "the mock tool failed").into_response(),
            false => (StatusCode::SERVICE_UNAVAILABLE, "the mock tool is busy").into_response(),
        };
    }
    let args: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Json(json!({"echo": args})).into_response()
}

/// Hangs on the first call with a key (for an hour: a worker that dies
/// meanwhile leaves the call uncertain), echoes on later ones.
async fn hang(
    State(c): State<Arc<Counters>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    count(&c, &headers);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("(none)");
    let seen = c
        .keys
        .lock()
        .map(|k| k.get(key).copied().unwrap_or(0))
        .unwrap_or(0);
    if seen <= 1 {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let args: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Json(json!({"echo": args, "repeated": true})).into_response()
}

/// Records a webhook notification (503 while `hooks_down`).
async fn hook(
    State(c): State<Arc<Counters>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if c.hooks_down.load(Ordering::Relaxed) {
        c.hooks_refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    if let Ok(mut hooks) = c.hooks.lock() {
        hooks.push(Hook {
            name,
            event: header("keel-event"),
            signature: header("keel-signature"),
            delivery: header("keel-delivery"),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    StatusCode::NO_CONTENT.into_response()
}

async fn fail(State(c): State<Arc<Counters>>, headers: HeaderMap) -> Response {
    count(&c, &headers);
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "the mock tool always fails",
    )
        .into_response()
}

/// Answers a request's method, URI and headers as JSON, with the status of
/// its `status` query parameter (200 by default), and keeps the answer.
async fn mirror(
    State(c): State<Arc<Counters>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    count(&c, &headers);
    let status = query_param(&uri, "status")
        .and_then(|s| s.parse().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.to_string(), Value::String(value))
        })
        .collect();
    let answer = json!({"method": method.as_str(), "uri": uri.to_string(), "headers": headers});
    if let Ok(mut mirrored) = c.mirrored.lock() {
        mirrored.push(answer.to_string());
    }
    (status, Json(answer)).into_response()
}

/// 307 to the `to` query parameter (method and body kept).
async fn redirect(
    State(c): State<Arc<Counters>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    count(&c, &headers);
    let Some(to) = query_param(&uri, "to") else {
        return (StatusCode::BAD_REQUEST, "`to` is missing").into_response();
    };
    (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response()
}

/// The decoded value of query parameter `name` of `uri`.
fn query_param(uri: &axum::http::Uri, name: &str) -> Option<String> {
    let query = uri.query()?;
    let url = reqwest::Url::parse(&format!("http://mock/?{query}")).ok()?;
    url.query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}
