//! LLM providers: turn a run's conversation into one model answer.
//!
//! [`Client::complete`] rebuilds the request from the run's fold (the system
//! prompt of the pinned agent version, then the journaled messages), so a step
//! retried after a crash sends the same conversation. [`Client::stream`] asks
//! for the same answer as a stream and hands each piece ([`Delta`]) to a
//! callback as it arrives; both return the same [`Response`]. Failures are
//! classified once, here: [`Error::Transient`] is worth retrying,
//! [`Error::Permanent`] is not until someone fixes the spec or the environment.
//!
//! Every call is bounded by `model.timeout`; a streamed call also fails when
//! the provider goes silent for longer than the idle timeout (`model.idle_timeout`,
//! else the client's), so a hung connection never holds a worker.
//!
//! # Layout
//!
//! * this file: [`Client`], [`Response`], [`Delta`], [`Finish`], [`Error`], and
//!   what both wire protocols share: the API key, the status classification,
//!   reading an event stream under its timeouts.
//! * `openai`: any OpenAI-compatible `POST {base_url}/chat/completions`
//!   (OpenAI, vLLM, Ollama, llama.cpp), plain and streamed.
//! * `anthropic`: the Anthropic Messages API, `POST {base_url}/messages`,
//!   plain and streamed.
//! * `scripted`: replays `model.script`, one turn per step, with no network: a
//!   stand-in for offline demos and tests, never a real model.
//! * `sse`: an incremental Server-Sent Events parser over the response bytes.

mod anthropic;
mod openai;
mod scripted;
mod sse;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use keel_core::RunId;
use keel_core::message::{Message, Usage};
use keel_core::run::State;
use keel_core::spec::{Agent, ModelSpec, Provider, clip, human_duration, redact_url};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderValue};
use tokio::time::Instant;

/// Where OpenAI-compatible requests go when the spec names no `base_url`.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// Where Anthropic requests go when the spec names no `base_url`.
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com/v1";

/// The `anthropic-version` header every Anthropic request carries.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// `max_tokens` of an Anthropic request when the spec sets none (the API
/// requires one).
pub const ANTHROPIC_MAX_TOKENS: u32 = 4096;

/// Longest silence between two chunks of a streamed answer when the spec
/// sets no `model.idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How many bytes of an error body go into an error message.
const ERROR_BODY_BYTES: usize = 300;

/// Reads an environment variable; replaceable for tests and embedding.
type Lookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Calls the model an agent spec names. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    env: Lookup,
    idle_timeout: Duration,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
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
    /// Why the model stopped.
    pub finish: Finish,
}

/// Why the model stopped writing, in common words for every provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    /// It finished its turn (OpenAI `stop`; Anthropic `end_turn`, `stop_sequence`).
    Stop,
    /// It asks for tools (OpenAI `tool_calls`; Anthropic `tool_use`).
    ToolCalls,
    /// It was cut off at `max_tokens` (OpenAI `length`; Anthropic `max_tokens`):
    /// the text or the last tool call's arguments may be incomplete.
    Length,
    /// The provider withheld the answer (OpenAI `content_filter`; Anthropic `refusal`).
    Filtered,
    /// Another reason, in the provider's words; empty when it gave none.
    Other(String),
}

impl Finish {
    /// Reads an OpenAI `finish_reason` or an Anthropic `stop_reason`.
    pub fn from_wire(reason: Option<&str>) -> Finish {
        match reason.unwrap_or("") {
            "stop" | "end_turn" | "stop_sequence" => Finish::Stop,
            "tool_calls" | "function_call" | "tool_use" => Finish::ToolCalls,
            "length" | "max_tokens" | "model_context_window_exceeded" => Finish::Length,
            "content_filter" | "refusal" => Finish::Filtered,
            other => Finish::Other(other.to_string()),
        }
    }
}

/// A piece of an answer, as it arrives from a streamed call.
///
/// The text deltas of an answer concatenate to its content; the argument
/// fragments of a call concatenate to its arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delta {
    /// More text of the answer.
    Text(String),
    /// A tool call begins: its position among the answer's calls (from 0), its
    /// id and its tool, as known when it first appears.
    ToolCall {
        /// Position among the answer's tool calls.
        index: usize,
        /// The provider's id for the call (`call_<step>_<index>` when a local
        /// server sends none, as for a plain answer).
        id: String,
        /// Name of the tool.
        name: String,
    },
    /// More of a tool call's arguments (raw text; JSON once complete).
    ToolArguments {
        /// Position among the answer's tool calls.
        index: usize,
        /// The next piece of the arguments.
        fragment: String,
    },
}

/// How the message of a call that ran out of time starts.
const TIMED_OUT: &str = "LLM call timed out";
/// How the message of a stream that went silent starts.
const STALLED: &str = "LLM stream stalled";

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Worth retrying: network error, timeout, a stalled or cut stream, 408,
    /// 429, 5xx (Anthropic's 529 too), an unreadable 200 body or chunk, a
    /// provider error in the middle of a stream that says it is overloaded.
    #[error("{message}")]
    Transient {
        /// What happened, safe to journal and show (no headers, no key).
        message: String,
        /// How long the provider asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
        /// The provider refused for its rate limit (429): the endpoint works,
        /// it asks for less. Not a failure of the endpoint (circuit breaker).
        throttled: bool,
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

    /// Whether the call ran out of time: `model.timeout` passed, or a
    /// stream went silent for longer than its idle timeout.
    pub fn is_timeout(&self) -> bool {
        match self {
            Error::Transient { message, .. } => {
                message.starts_with(TIMED_OUT) || message.starts_with(STALLED)
            }
            Error::Permanent { .. } => false,
        }
    }

    /// Whether the provider refused for its rate limit (429).
    pub fn is_throttled(&self) -> bool {
        matches!(
            self,
            Error::Transient {
                throttled: true,
                ..
            }
        )
    }

    fn transient(message: String) -> Error {
        Error::Transient {
            message,
            retry_after: None,
            throttled: false,
        }
    }

    fn permanent(message: String) -> Error {
        Error::Permanent { message }
    }
}

/// The wire protocols reached over HTTP.
#[derive(Clone, Copy, Debug)]
enum Wire {
    Openai,
    Anthropic,
}

impl Client {
    /// A client reading API keys from the process environment at call time.
    pub fn new(http: reqwest::Client) -> Client {
        Client {
            http,
            env: Arc::new(|name| std::env::var(name).ok()),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
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

    /// Sets the longest silence between two chunks of a streamed answer for
    /// specs without `model.idle_timeout` (default [`DEFAULT_IDLE_TIMEOUT`]).
    pub fn with_idle_timeout(mut self, idle: Duration) -> Client {
        self.idle_timeout = idle;
        self
    }

    /// Asks the model for step `step` (1-based) of the run whose fold is `state`.
    pub async fn complete(
        &self,
        agent: &Agent,
        state: &State,
        step: u32,
    ) -> Result<Response, Error> {
        self.complete_with(&agent.spec.model, agent, state, step)
            .await
    }

    /// Like [`Client::complete`], with another model than the spec's own (a
    /// fallback of `model.fallbacks`): the agent's prompt and tools, that
    /// model's endpoint, key and settings.
    pub async fn complete_with(
        &self,
        model: &ModelSpec,
        agent: &Agent,
        state: &State,
        step: u32,
    ) -> Result<Response, Error> {
        match &model.provider {
            Provider::Openai => {
                self.call(model, agent, state, step, Wire::Openai, None)
                    .await
            }
            Provider::Anthropic => {
                self.call(model, agent, state, step, Wire::Anthropic, None)
                    .await
            }
            Provider::Scripted => scripted::answer(agent, state, step),
            Provider::Named(name) => Err(unconfigured(name)),
        }
    }

    /// Like [`Client::complete`], but the answer is streamed: `on_delta` gets
    /// each piece as it arrives, in order, and the same [`Response`] comes back
    /// at the end. On an error, the pieces already delivered are all there is
    /// (a retry starts the answer over). A provider that answers a streaming
    /// request with a plain JSON body is read as such, and its answer is
    /// delivered as deltas at once.
    pub async fn stream(
        &self,
        agent: &Agent,
        state: &State,
        step: u32,
        on_delta: impl FnMut(Delta) + Send,
    ) -> Result<Response, Error> {
        self.stream_with(&agent.spec.model, agent, state, step, on_delta)
            .await
    }

    /// [`Client::stream`] with another model than the spec's own.
    pub async fn stream_with(
        &self,
        model: &ModelSpec,
        agent: &Agent,
        state: &State,
        step: u32,
        mut on_delta: impl FnMut(Delta) + Send,
    ) -> Result<Response, Error> {
        let on_delta: &mut (dyn FnMut(Delta) + Send) = &mut on_delta;
        match &model.provider {
            Provider::Named(name) => Err(unconfigured(name)),
            Provider::Openai => {
                self.call(model, agent, state, step, Wire::Openai, Some(on_delta))
                    .await
            }
            Provider::Anthropic => {
                self.call(model, agent, state, step, Wire::Anthropic, Some(on_delta))
                    .await
            }
            Provider::Scripted => {
                let response = scripted::answer(agent, state, step)?;
                replay(&response, on_delta);
                Ok(response)
            }
        }
    }

    /// One HTTP call; streamed when there is someone to hand deltas to.
    async fn call(
        &self,
        model: &ModelSpec,
        agent: &Agent,
        state: &State,
        step: u32,
        wire: Wire,
        on_delta: Option<&mut (dyn FnMut(Delta) + Send)>,
    ) -> Result<Response, Error> {
        let key = self.api_key(model)?;
        let scrub = Scrub { key: key.clone() };
        let streaming = on_delta.is_some();
        let request = match wire {
            Wire::Openai => {
                openai::request(&self.http, agent, model, state, key.as_deref(), streaming)?
            }
            Wire::Anthropic => {
                anthropic::request(&self.http, agent, model, state, key.as_deref(), streaming)?
            }
        };
        let request = request
            .timeout(model.timeout)
            .header("traceparent", traceparent(state.run_id));

        let started = Instant::now();
        let response = request
            .send()
            .await
            .map_err(|e| Error::transient(describe(e, model.timeout)))?;
        let status = response.status();
        let event_stream = streaming && !is_json(response.headers());
        let result = match on_delta {
            _ if !status.is_success() => Err(status_error(response, &scrub, model.timeout).await),
            Some(on_delta) if event_stream => {
                let idle = model
                    .idle_timeout
                    .unwrap_or(self.idle_timeout)
                    .min(model.timeout);
                // A timeout too large to add (a number of seconds in the spec) is a year.
                let deadline = started
                    .checked_add(model.timeout)
                    .unwrap_or_else(|| started + Duration::from_secs(365 * 86_400));
                let limits = Limits {
                    deadline,
                    timeout: model.timeout,
                    idle,
                };
                match wire {
                    Wire::Openai => {
                        let decoder = openai::Decoder::new(step, &model.model, scrub);
                        read_stream(response, decoder, limits, on_delta).await
                    }
                    Wire::Anthropic => {
                        let decoder = anthropic::Decoder::new(step, &model.model, scrub);
                        read_stream(response, decoder, limits, on_delta).await
                    }
                }
            }
            on_delta => {
                let text = response
                    .text()
                    .await
                    .map_err(|e| Error::transient(describe(e, model.timeout)))?;
                let parsed = match wire {
                    Wire::Openai => openai::parse(&text, step, &model.model),
                    Wire::Anthropic => anthropic::parse(&text, step, &model.model),
                };
                match parsed {
                    Ok(response) => {
                        // A JSON body answering a streaming request: its deltas at once.
                        if let Some(on_delta) = on_delta {
                            replay(&response, on_delta);
                        }
                        Ok(response)
                    }
                    Err(problem) => Err(Error::transient(format!(
                        "LLM endpoint returned HTTP {status} with an unreadable body ({problem}): {}",
                        scrub.text(&text)
                    ))),
                }
            }
        };
        tracing::debug!(
            run_id = %state.run_id,
            step,
            status = status.as_u16(),
            streamed = event_stream,
            ok = result.is_ok(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "llm call returned"
        );
        result
    }

    /// The API key the spec names, read now; `None` when it names none.
    fn api_key(&self, model: &ModelSpec) -> Result<Option<String>, Error> {
        let Some(var) = &model.api_key_env else {
            let Some(path) = &model.api_key_file else {
                return Ok(None);
            };
            return match std::fs::read_to_string(path) {
                Ok(key) if !key.trim().is_empty() => Ok(Some(key.trim().to_string())),
                Ok(_) => Err(Error::permanent(format!(
                    "the key file {path} (api_key_file of the server configuration) is empty"
                ))),
                Err(e) => Err(Error::permanent(format!(
                    "cannot read the key file {path} (api_key_file of the server configuration): {e}"
                ))),
            };
        };
        match (self.env)(var) {
            Some(value) if !value.is_empty() => Ok(Some(value)),
            _ => Err(Error::permanent(format!(
                "environment variable `{var}` (model.api_key_env) is not set on the server"
            ))),
        }
    }
}

/// A model naming a provider the server configuration does not have (the
/// gateway turns a configured one into its protocol before a call).
fn unconfigured(name: &str) -> Error {
    Error::permanent(format!(
        "model.provider `{name}` is not a provider of the server configuration (keel serve --config) nor one of openai, anthropic, scripted"
    ))
}

/// Where a provider's requests go: `{base_url}/{path}`.
fn endpoint(model: &ModelSpec, default_base: &str, path: &str) -> Result<reqwest::Url, Error> {
    let base = model.base_url.as_deref().unwrap_or(default_base);
    let endpoint = format!("{}/{path}", base.trim_end_matches('/'));
    reqwest::Url::parse(&endpoint).map_err(|e| {
        Error::permanent(format!(
            "model.base_url `{}` is not a valid URL: {e}",
            redact_url(base)
        ))
    })
}

/// A header value carrying the API key, marked sensitive (never logged).
fn secret_header(value: &str, model: &ModelSpec) -> Result<HeaderValue, Error> {
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        let var = model.api_key_env.as_deref().unwrap_or_default();
        Error::permanent(format!(
            "the value of `{var}` is not a valid HTTP header value"
        ))
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Shows provider text in an error message: the API key replaced, clipped.
/// (No `Debug`: it holds the key.)
#[derive(Clone, Default)]
struct Scrub {
    key: Option<String>,
}

impl Scrub {
    fn text(&self, text: &str) -> String {
        match &self.key {
            Some(key) if !key.is_empty() => {
                clip(&text.replace(key.as_str(), "[redacted]"), ERROR_BODY_BYTES)
            }
            _ => clip(text, ERROR_BODY_BYTES),
        }
    }
}

/// A non-2xx answer as an error: 408, 429 and 5xx (Anthropic's 529 among
/// them) are transient and carry the provider's `Retry-After`; the rest
/// (400, 401, 403, 404, 413 …) are permanent.
async fn status_error(response: reqwest::Response, scrub: &Scrub, timeout: Duration) -> Error {
    let status = response.status();
    let transient = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT;
    let retry_after = if transient {
        retry_after(response.headers())
    } else {
        None
    };
    let text = match response.text().await {
        Ok(text) => text,
        Err(e) => return Error::transient(describe(e, timeout)),
    };
    let message = format!("LLM endpoint returned HTTP {status}: {}", scrub.text(&text));
    if transient {
        Error::Transient {
            message,
            retry_after,
            throttled: status == StatusCode::TOO_MANY_REQUESTS,
        }
    } else {
        Error::permanent(message)
    }
}

/// Whether a response says its body is JSON (a server that ignored `stream`).
fn is_json(headers: &header::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        })
}

/// Hands a whole answer to `on_delta` as the deltas a stream of it would give.
fn replay(response: &Response, on_delta: &mut (dyn FnMut(Delta) + Send)) {
    if let Some(text) = response
        .message
        .content
        .as_deref()
        .filter(|t| !t.is_empty())
    {
        on_delta(Delta::Text(text.to_string()));
    }
    for (index, call) in response.message.tool_calls.iter().enumerate() {
        on_delta(Delta::ToolCall {
            index,
            id: call.id.clone(),
            name: call.name.clone(),
        });
        if !call.arguments.is_empty() {
            on_delta(Delta::ToolArguments {
                index,
                fragment: call.arguments.clone(),
            });
        }
    }
}

/// Turns the events of one streamed answer into deltas and, at the end, the
/// [`Response`]. One per call; fed by [`Feed`].
trait Decode {
    /// What ends a complete stream, for the message when it never came.
    const END: &'static str;

    /// Reads one event; `Ok(true)` when it ended the answer.
    fn event(
        &mut self,
        event: sse::Event,
        on_delta: &mut (dyn FnMut(Delta) + Send),
    ) -> Result<bool, Error>;

    /// The answer, once [`Decode::event`] said it ended.
    fn into_response(self) -> Response;
}

/// The bytes of one streamed answer going through the SSE parser into a
/// decoder: everything about a stream except the network and the clock.
struct Feed<D> {
    parser: sse::Parser,
    decoder: D,
}

impl<D: Decode> Feed<D> {
    fn new(decoder: D) -> Feed<D> {
        Feed {
            parser: sse::Parser::default(),
            decoder,
        }
    }

    /// Takes the next piece of the body; `Ok(true)` once the answer is complete
    /// (the rest of the body, if any, does not matter).
    fn push(
        &mut self,
        bytes: &[u8],
        on_delta: &mut (dyn FnMut(Delta) + Send),
    ) -> Result<bool, Error> {
        self.parser.feed(bytes);
        loop {
            let event = self.parser.next_event().map_err(|e| {
                Error::transient(format!("LLM stream is not a valid event stream: {e}"))
            })?;
            let Some(event) = event else {
                return Ok(false);
            };
            if self.decoder.event(event, on_delta)? {
                return Ok(true);
            }
        }
    }

    /// The body ended before the answer did: a last event missing only its
    /// blank line still counts; anything less is a cut stream, worth retrying.
    fn end(mut self, on_delta: &mut (dyn FnMut(Delta) + Send)) -> Result<Response, Error> {
        if let Some(event) = self.parser.finish()
            && self.decoder.event(event, on_delta)?
        {
            return Ok(self.decoder.into_response());
        }
        Err(Error::transient(format!(
            "LLM stream ended before {}: the connection closed mid-answer",
            D::END
        )))
    }
}

/// The clock of one streamed call.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// When the whole call must be over (`model.timeout` after it started).
    deadline: Instant,
    /// `model.timeout`, for the message.
    timeout: Duration,
    /// The longest wait for the next chunk.
    idle: Duration,
}

/// Reads a streamed answer chunk by chunk until the decoder says it ended.
async fn read_stream<D: Decode>(
    mut response: reqwest::Response,
    decoder: D,
    limits: Limits,
    on_delta: &mut (dyn FnMut(Delta) + Send),
) -> Result<Response, Error> {
    let mut feed = Feed::new(decoder);
    loop {
        let left = limits.deadline.saturating_duration_since(Instant::now());
        let wait = left.min(limits.idle);
        let chunk = match tokio::time::timeout(wait, response.chunk()).await {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => return feed.end(on_delta),
            Ok(Err(e)) => return Err(Error::transient(describe(e, limits.timeout))),
            Err(_) if left <= limits.idle => {
                return Err(Error::transient(format!(
                    "{TIMED_OUT} after {}",
                    human_duration::format(limits.timeout)
                )));
            }
            Err(_) => {
                return Err(Error::transient(format!(
                    "{STALLED}: nothing received for {}",
                    human_duration::format(limits.idle)
                )));
            }
        };
        if feed.push(&chunk, on_delta)? {
            return Ok(feed.decoder.into_response());
        }
    }
}

/// A W3C `traceparent` for an outgoing call of run `run_id`: the run's trace id
/// and the span of the call being made ([`crate::trace::within`]), else a
/// fresh, non-zero span id; sampled.
pub(crate) fn traceparent(run_id: RunId) -> String {
    let span_id = crate::trace::current_span().unwrap_or_else(crate::trace::span_id);
    crate::trace::traceparent(run_id, span_id)
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
        return format!("{TIMED_OUT} after {}", human_duration::format(timeout));
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

/// Feeds a recorded stream to a decoder in pieces of `sizes` (cycled; a piece
/// of 0 means the rest), then ends it. For the providers' fixture tests.
#[cfg(test)]
fn decode_in_pieces<D: Decode>(
    decoder: D,
    stream: &[u8],
    sizes: &[usize],
) -> (Result<Response, Error>, Vec<Delta>) {
    let mut deltas = Vec::new();
    let mut on_delta = |d: Delta| deltas.push(d);
    let on_delta: &mut (dyn FnMut(Delta) + Send) = &mut on_delta;
    let mut feed = Feed::new(decoder);
    let mut rest = stream;
    let mut sizes = sizes.iter().cycle();
    let result = loop {
        if rest.is_empty() {
            break feed.end(on_delta);
        }
        let size = match sizes.next() {
            Some(&n) if n > 0 => n.min(rest.len()),
            _ => rest.len(),
        };
        let (piece, tail) = rest.split_at(size);
        rest = tail;
        match feed.push(piece, on_delta) {
            Ok(true) => break Ok(feed.decoder.into_response()),
            Ok(false) => {}
            Err(e) => break Err(e),
        }
    };
    (result, deltas)
}

/// Decodes `stream` whole, byte by byte and in random piece sizes (fixed
/// seeds), checks that every split gives the same answer and deltas, and
/// returns them.
#[cfg(test)]
fn decode_every_split<D: Decode>(
    new: impl Fn() -> D,
    stream: &[u8],
) -> (Result<Response, String>, Vec<Delta>) {
    let show = |(result, deltas): (Result<Response, Error>, Vec<Delta>)| {
        (result.map_err(|e| format!("{e:?}")), deltas)
    };
    let whole = show(decode_in_pieces(new(), stream, &[0]));
    assert_eq!(
        show(decode_in_pieces(new(), stream, &[1])),
        whole,
        "byte by byte"
    );
    for seed in 0..20 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let sizes: Vec<usize> = (0..64).map(|_| rng.usize(1..40)).collect();
        assert_eq!(
            show(decode_in_pieces(new(), stream, &sizes)),
            whole,
            "pieces of {sizes:?}"
        );
    }
    whole
}
