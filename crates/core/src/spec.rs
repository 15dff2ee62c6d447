//! Agent specs: the YAML (or JSON) a team writes, parsed, validated with errors
//! that name the field at fault, and compiled into an [`Agent`] (the spec plus
//! the JSON Schema validators of its tools).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::approval::{Approvals, OnTimeout, OnUncertain, RequiresApproval};
use crate::saga::Compensate;

/// A validation failure: which field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Dotted path of the field, e.g. `tools[1].http.url`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not valid YAML or JSON.
    #[error("spec is not valid YAML/JSON: {0}")]
    Syntax(String),
    /// One or more fields are missing, unknown or invalid.
    #[error("invalid agent spec: {}", join(.0))]
    Invalid(Vec<FieldError>),
}

fn join(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

impl Error {
    /// The field errors, if this is a validation failure.
    pub fn fields(&self) -> &[FieldError] {
        match self {
            Error::Syntax(_) => &[],
            Error::Invalid(errors) => errors,
        }
    }
}

/// An agent spec, exactly as written (after defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Agent name, the key runs are submitted to.
    pub name: String,
    /// Version label; a run is pinned to the version it started with.
    #[serde(deserialize_with = "string_or_number")]
    pub version: String,
    /// Free text for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The model and how to reach it.
    pub model: ModelSpec,
    /// System prompt sent first in every request.
    #[serde(default)]
    pub system: String,
    /// Tools the model may call.
    #[serde(default)]
    pub tools: Vec<ToolSpec>,
    /// Limits on one run.
    #[serde(default)]
    pub limits: Limits,
    /// Retry policy of the run's LLM tasks.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Which tool calls wait for a human decision, for how long, and who is told.
    #[serde(default, skip_serializing_if = "Approvals::is_empty")]
    pub approvals: Approvals,
    /// A JSON Schema the final answer must match: the answer must then be
    /// one JSON value (a code fence around it is taken off); one that is not,
    /// or does not match, goes back to the model to correct, as a step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
}

/// Which wire protocol reaches the model, or which configured provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provider {
    /// Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, llama.cpp).
    Openai,
    /// The Anthropic Messages API (`POST {base_url}/messages`).
    Anthropic,
    /// Replays `model.script` deterministically: for offline demos and tests only.
    Scripted,
    /// A provider of the server configuration (`providers.<name>`), which
    /// gives its protocol, endpoint and key.
    Named(String),
}

impl Provider {
    /// The name a spec writes (`openai`, `anthropic`, `scripted`, or the
    /// configured provider's).
    pub fn name(&self) -> &str {
        match self {
            Provider::Openai => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Scripted => "scripted",
            Provider::Named(name) => name,
        }
    }

    /// The provider a spec's `model.provider` names.
    pub fn from_name(name: &str) -> Provider {
        match name {
            "openai" | "openai_compatible" => Provider::Openai,
            "anthropic" => Provider::Anthropic,
            "scripted" => Provider::Scripted,
            other => Provider::Named(other.to_string()),
        }
    }
}

impl Serialize for Provider {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Provider {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(Provider::from_name(&name))
    }
}

/// `model:` section of a spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Protocol of the endpoint.
    pub provider: Provider,
    /// Model name sent to the endpoint.
    pub model: String,
    /// Base URL of the endpoint (the part before `/chat/completions` or `/messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Name of the environment variable holding the API key (never the key itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Sampling temperature, 0 to 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Maximum completion tokens per call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Timeout of one LLM call.
    #[serde(default = "default_llm_timeout", with = "human_duration")]
    pub timeout: Duration,
    /// Longest silence between two chunks of a streamed answer (the client's
    /// default when unset; never more than `timeout`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "human_duration::option"
    )]
    pub idle_timeout: Option<Duration>,
    /// Stream the answer: its text is forwarded to the run's event stream
    /// (`llm_delta` events) as it arrives, persisted in small batches, and
    /// replaced by the final message once the step is journaled.
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// The turns a `scripted` provider replays, one per LLM call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub script: Vec<ScriptTurn>,
    /// A file holding the API key: never written in a spec (it is not read
    /// from one), filled in from the server configuration's `api_key_file`.
    #[serde(skip)]
    pub api_key_file: Option<String>,
    /// Models to call, in order, while this one's circuit breaker is open
    /// (each a model section of its own, without fallbacks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<ModelSpec>,
}

/// Whether a flag is off (then it is not serialized: specs stored before
/// it existed compare equal).
fn is_false(flag: &bool) -> bool {
    !*flag
}

/// One scripted model answer: tool calls, or final content.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptTurn {
    /// Text of the answer. `{{tool_result}}` is replaced with the latest tool result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool calls of the answer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ScriptCall>,
}

/// A scripted tool call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptCall {
    /// Tool name.
    pub name: String,
    /// Arguments (any JSON; sent to the tool as written).
    #[serde(default = "empty_object")]
    pub arguments: Value,
}

/// A tool the model may call, or (with `mcp`) the tools of an MCP server
/// it may call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolSpec {
    /// Name the model uses (empty for an `mcp` entry: its tools keep their
    /// own names, shown as `<server>__<tool>`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// What the tool does, shown to the model.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// An HTTP endpoint implementing the tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpTool>,
    /// A tool built into Keel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<Builtin>,
    /// A tool implemented by external workers: each call becomes a task of
    /// this queue, leased over HTTP (`POST /v1/worker/tasks/lease`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Whether a call waits for a human decision: `true`, or `{when: <condition>}`.
    #[serde(default, skip_serializing_if = "RequiresApproval::is_never")]
    pub requires_approval: RequiresApproval,
    /// The tool may be called twice with the same idempotency key without
    /// harm (then an uncertain call is retried by default).
    #[serde(default, skip_serializing_if = "is_false")]
    pub idempotent: bool,
    /// What recovery does with a call that may or may not have happened
    /// (default: `retry` when idempotent or a read-only built-in, else `ask`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_uncertain: Option<OnUncertain>,
    /// Folder a file built-in may read (relative paths resolve against the server's
    /// working directory, or the spec file's folder for `keel run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<String>,
    /// With `builtin: spawn_agents`: the agents a call may start as child
    /// runs (registered agent names; `self` is this agent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// An MCP server of the server configuration (`mcp_servers.<name>`)
    /// whose tools the model may call, those matching `allow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<String>,
    /// With `mcp`: the server's tool names the model may see and call,
    /// `*` matching any run of characters (`list_*`, `*`). Every other tool
    /// of the server is invisible to the model and refused if it names one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// What undoes a successful call when the run fails or is cancelled
    /// later (a saga): a tool and an argument template, see [`crate::saga`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensate: Option<Compensate>,
    /// With `builtin: spawn_agents`: what a child run does when one of its
    /// tasks is dead-lettered (default `fail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_dead_letter: Option<OnDeadLetter>,
}

/// What a child run does when one of its LLM or tool tasks runs out of
/// attempts (a submitted run parks in the dead-letter queue).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadLetter {
    /// The child fails (`dead_lettered`, after its compensations) and its
    /// parent's fan-in gets that failure: the parent's model decides.
    #[default]
    Fail,
    /// The child parks in the dead-letter queue like a submitted run and
    /// its parent keeps waiting (until a retry resumes the child, or the
    /// parent's own `limits.timeout`).
    Wait,
}

impl OnDeadLetter {
    /// Whether this is the default, `fail`.
    pub fn is_fail(&self) -> bool {
        *self == OnDeadLetter::Fail
    }
}

/// Whether an `allow` list lets the tool `name` through (`*` matches any
/// run of characters, everything else itself).
pub fn allows(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| glob(p, name))
}

fn glob(pattern: &str, name: &str) -> bool {
    let Some((first, rest)) = pattern.split_once('*') else {
        return pattern == name;
    };
    let Some(mut tail) = name.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or_default();
    for part in parts {
        match tail.find(part) {
            Some(i) => tail = &tail[i + part.len()..],
            None => return false,
        }
    }
    tail.len() >= last.len() && tail.ends_with(last)
}

/// A tool an MCP server lists, as the model sees it once an agent's
/// `allow` lets it through.
#[derive(Clone, Debug, PartialEq)]
pub struct McpTool {
    /// The name the model sees and calls: `<server>__<tool>`.
    pub name: String,
    /// The server (`mcp_servers.<server>` of the configuration).
    pub server: String,
    /// The server's name for the tool.
    pub tool: String,
    /// What it does, as the server describes it.
    pub description: String,
    /// Its input schema, as the server lists it.
    pub parameters: Value,
}

impl McpTool {
    /// A tool `server` lists.
    pub fn new(server: &str, tool: &str, description: String, parameters: Value) -> McpTool {
        McpTool {
            name: format!("{server}__{tool}"),
            server: server.to_string(),
            tool: tool.to_string(),
            description,
            parameters,
        }
    }
}

/// A tool as the model is offered it: name, description, argument schema.
#[derive(Clone, Debug, PartialEq)]
pub struct Offered {
    /// The name the model calls.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON Schema of its arguments.
    pub parameters: Value,
}

/// Tools that ship with Keel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Builtin {
    /// Reads a UTF-8 file under `root`: `{"path": "notes.md"}`.
    ReadFile,
    /// Lists the files under `root`: `{}`.
    ListFiles,
    /// Starts child runs and waits for all of them (fan-out, fan-in):
    /// `{"tasks": [{"agent": "researcher", "input": ...}, ...]}`, each agent
    /// one of the tool's `agents`. The result is their outcomes in order.
    SpawnAgents,
}

/// The name by which a `spawn_agents` tool's `agents` list names the agent
/// itself.
pub const SELF_AGENT: &str = "self";

/// HTTP methods a tool may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// Arguments go in the query string.
    Get,
    /// Arguments go in a JSON body.
    Post,
    /// Arguments go in a JSON body.
    Put,
    /// Arguments go in a JSON body.
    Patch,
    /// Arguments go in the query string.
    Delete,
}

/// How an HTTP tool is called.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTool {
    /// Method; GET/DELETE send arguments as query parameters, others as a JSON body.
    #[serde(default = "default_method")]
    pub method: Method,
    /// URL; `{arg}` placeholders are filled from the arguments.
    pub url: String,
    /// Extra headers; `${ENV_VAR}` in a value is replaced at call time from the
    /// server's environment, so secrets never enter the spec, the journal or a prompt.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Timeout of one attempt.
    #[serde(default = "default_tool_timeout", with = "human_duration")]
    pub timeout: Duration,
    /// Retries of 5xx, 429 and network errors before the error goes to the model.
    #[serde(default = "default_tool_retry")]
    pub retry: RetryPolicy,
}

/// `limits:` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Maximum LLM calls in one run (malformed answers count too).
    #[serde(default = "default_max_steps")]
    pub max_steps: u32,
    /// Wall-clock limit of one run.
    #[serde(default = "default_run_timeout", with = "human_duration")]
    pub timeout: Duration,
    /// Most tokens (input + output, all LLM calls) one run may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_total: Option<u64>,
    /// Most one run may cost, in USD, priced by the server's price table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost: Option<f64>,
    /// How deep child runs may nest: a run submitted by a client is at
    /// depth 0, its children at 1, and a run at this depth may not spawn.
    #[serde(default = "default_max_depth")]
    pub max_depth: u32,
    /// Most child runs one `spawn_agents` call may start.
    #[serde(default = "default_max_fan_out")]
    pub max_fan_out: u32,
    /// Most child runs one run may start in all its steps.
    #[serde(default = "default_max_children")]
    pub max_children: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_steps: default_max_steps(),
            timeout: default_run_timeout(),
            max_tokens_total: None,
            max_cost: None,
            max_depth: default_max_depth(),
            max_fan_out: default_max_fan_out(),
            max_children: default_max_children(),
        }
    }
}

/// Attempts and backoff.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay between attempts.
    #[serde(default)]
    pub backoff: Backoff,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            backoff: Backoff::default(),
        }
    }
}

/// Exponential backoff with full jitter on the upper half.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Delay before the second attempt.
    #[serde(default = "default_initial", with = "human_duration")]
    pub initial: Duration,
    /// Upper bound of any delay.
    #[serde(default = "default_max_backoff", with = "human_duration")]
    pub max: Duration,
    /// Growth factor per attempt.
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: default_initial(),
            max: default_max_backoff(),
            multiplier: default_multiplier(),
        }
    }
}

impl Backoff {
    /// Delay after failed attempt number `attempt` (1-based). `jitter` in `[0, 1)`
    /// spreads the delay over its upper half so retries of many runs do not align.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let base = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        let jitter = jitter.clamp(0.0, 1.0);
        Duration::from_secs_f64(base * (0.5 + 0.5 * jitter))
    }
}

fn default_llm_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_tool_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_run_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_steps() -> u32 {
    20
}
fn default_max_depth() -> u32 {
    3
}
fn default_max_fan_out() -> u32 {
    20
}
fn default_max_children() -> u32 {
    100
}
fn default_max_attempts() -> u32 {
    5
}
fn default_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(60)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_method() -> Method {
    Method::Post
}
fn default_tool_retry() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        backoff: Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(5),
            multiplier: 2.0,
        },
    }
}
fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!(
            "expected a string or a number, found {other}"
        ))),
    }
}

/// Durations written as `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"7d"` or a number of seconds.
pub mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;

    /// Longest duration accepted, in seconds: 365 days.
    const MAX_SECONDS: f64 = 365.0 * 86400.0;

    /// Whether `seconds` is a duration we take (so it always fits a `Duration`).
    fn in_range(seconds: f64) -> bool {
        seconds.is_finite() && (0.0..=MAX_SECONDS).contains(&seconds)
    }

    /// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"7d"`, `"1.5s"` or `"30"`
    /// (seconds).
    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a duration like 500ms, 30s, 5m, 1h or 7d"))?;
        let seconds = match unit.trim() {
            "ms" => value / 1000.0,
            "" | "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            "d" => value * 86400.0,
            other => {
                return Err(format!(
                    "unknown duration unit `{other}` (use ms, s, m, h or d)"
                ));
            }
        };
        if !in_range(seconds) {
            return Err(format!("`{text}` is out of range (at most 365 days)"));
        }
        Ok(Duration::from_secs_f64(seconds))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn units_up_to_days() {
            assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
            assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
            assert_eq!(parse("30"), Ok(Duration::from_secs(30)));
            assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
            assert_eq!(parse("2h"), Ok(Duration::from_secs(7200)));
            assert_eq!(parse(" 30d "), Ok(Duration::from_secs(30 * 86400)));
            assert_eq!(parse("365d"), Ok(Duration::from_secs(365 * 86400)));
            let over = parse("366d").expect_err("over a year");
            assert!(over.contains("at most 365 days"), "{over}");
            let unit = parse("2w").expect_err("weeks are not a unit");
            assert!(unit.contains("unknown duration unit `w`"), "{unit}");
            let text = parse("soon").expect_err("not a number");
            assert!(text.contains("not a duration"), "{text}");
        }
    }

    /// Formats a duration the way [`parse`] reads it.
    pub fn format(d: Duration) -> String {
        let ms = d.as_millis();
        if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        }
    }

    /// Serde serializer.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    /// Serde (de)serializers for an optional duration (`None` when absent).
    pub mod option {
        use std::time::Duration;

        use serde::{Deserializer, Serializer};

        /// Serde serializer.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Serde deserializer (only called when the field is present).
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            super::deserialize(d).map(Some)
        }
    }

    /// Serde deserializer.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => parse(&s).map_err(serde::de::Error::custom),
            Value::Number(n) => match n.as_f64() {
                Some(secs) if in_range(secs) => Ok(Duration::from_secs_f64(secs)),
                _ => Err(serde::de::Error::custom(format!(
                    "duration {n} must be a number of seconds from 0 to {MAX_SECONDS} (365 days)"
                ))),
            },
            other => Err(serde::de::Error::custom(format!(
                "expected a duration like \"30s\", found {other}"
            ))),
        }
    }
}

/// A validated spec with its tools' argument validators compiled, and the
/// MCP tools it may use once the engine has resolved them
/// ([`Agent::with_mcp_tools`]).
#[derive(Clone)]
pub struct Agent {
    /// The spec.
    pub spec: Spec,
    validators: HashMap<String, Arc<jsonschema::Validator>>,
    /// The compiled `output_schema`.
    output: Option<Arc<jsonschema::Validator>>,
    mcp: Vec<McpTool>,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent").field("spec", &self.spec).finish()
    }
}

impl Agent {
    /// Parses YAML or JSON text (JSON is YAML) and validates it.
    pub fn parse(text: &str) -> Result<Agent, Error> {
        let value = crate::yaml::parse(text).map_err(Error::Syntax)?;
        Agent::from_value(value)
    }

    /// Validates an already-parsed JSON value.
    pub fn from_value(value: Value) -> Result<Agent, Error> {
        if let Some(field) = nul_at(&value, "") {
            return Err(Error::Invalid(vec![FieldError {
                field,
                message: "holds U+0000 (NUL), which a spec cannot hold".into(),
            }]));
        }
        let spec: Spec = typed(
            value,
            "an agent spec must be a mapping with name, version and model",
        )
        .map_err(Error::Invalid)?;
        Agent::new(spec)
    }

    /// Validates a spec and compiles its tool schemas.
    pub fn new(spec: Spec) -> Result<Agent, Error> {
        let mut errors = Vec::new();
        let mut err = |field: String, message: String| errors.push(FieldError { field, message });
        check_name(&spec.name, "name", &mut err);
        check_name(&spec.version, "version", &mut err);

        check_model(&spec.model, "model", &mut err);
        for (i, fallback) in spec.model.fallbacks.iter().enumerate() {
            let at = format!("model.fallbacks[{i}]");
            check_model(fallback, &at, &mut err);
            if !fallback.fallbacks.is_empty() {
                err(
                    format!("{at}.fallbacks"),
                    "a fallback has no fallbacks of its own (list them all in model.fallbacks)"
                        .into(),
                );
            }
        }

        let mut validators = HashMap::new();
        for (i, tool) in spec.tools.iter().enumerate() {
            let at = format!("tools[{i}]");
            if let Some(server) = &tool.mcp {
                check_mcp_entry(&spec.tools[..i], tool, server, &at, &mut err);
                continue;
            }
            if !tool.allow.is_empty() {
                err(
                    format!("{at}.allow"),
                    "only an `mcp` entry takes an allow list".into(),
                );
            }
            if !is_tool_name(&tool.name) {
                err(
                    format!("{at}.name"),
                    format!("`{}` must be 1-64 letters, digits, `_` or `-`", tool.name),
                );
            }
            if spec.tools[..i].iter().any(|t| t.name == tool.name) {
                err(
                    format!("{at}.name"),
                    format!("duplicate tool name `{}`", tool.name),
                );
            }
            match (&tool.http, &tool.builtin) {
                (Some(_), Some(_)) => err(
                    at.clone(),
                    "set either `http` or `builtin`, not both".into(),
                ),
                (None, None) if tool.worker.is_none() => err(
                    at.clone(),
                    "set `http` (an endpoint), `builtin` (read_file, list_files), `worker` (a queue of external workers) or `mcp` (a configured MCP server)".into(),
                ),
                (None, None) => {}
                (Some(http), None) => {
                    if !is_http_url(&http.url) {
                        err(
                            format!("{at}.http.url"),
                            format!("`{}` is not an http(s) URL", redact_url(&http.url)),
                        );
                    } else if let Err(message) = check_secret_refs(&http.url) {
                        err(format!("{at}.http.url"), message);
                    } else if let Some(part) = literal_url_secret(&http.url) {
                        err(format!("{at}.http.url"), literal_credential(&part));
                    }
                    for (name, value) in &http.headers {
                        if let Err(message) = check_secret_refs(value) {
                            err(format!("{at}.http.headers.{name}"), message);
                        } else if is_credential_header(name) && !value.contains("${") {
                            err(
                                format!("{at}.http.headers.{name}"),
                                literal_credential(&format!("`{name}`")),
                            );
                        }
                    }
                    if http.timeout.is_zero() {
                        err(format!("{at}.http.timeout"), "must be positive".into());
                    }
                    check_retry(&http.retry, &format!("{at}.http.retry"), &mut err);
                    if tool.root.is_some() {
                        err(
                            format!("{at}.root"),
                            "only file built-ins take a root".into(),
                        );
                    }
                }
                (None, Some(Builtin::SpawnAgents)) => {
                    check_spawn(tool, &spec.name, &at, &mut err);
                }
                (None, Some(_)) => {
                    if tool.root.as_deref().is_none_or(|r| r.trim().is_empty()) {
                        err(
                            format!("{at}.root"),
                            "file built-ins need the folder they may read".into(),
                        );
                    }
                }
            }
            if !tool.agents.is_empty() && tool.builtin != Some(Builtin::SpawnAgents) {
                err(
                    format!("{at}.agents"),
                    "only a `builtin: spawn_agents` tool takes an agents list".into(),
                );
            }
            if tool.on_dead_letter.is_some() && tool.builtin != Some(Builtin::SpawnAgents) {
                err(
                    format!("{at}.on_dead_letter"),
                    "only a `builtin: spawn_agents` tool takes on_dead_letter (what its child runs do with a dead letter)".into(),
                );
            }
            if let Some(queue) = &tool.worker {
                check_worker(tool, queue, &at, &mut err);
            }
            let schema = tool_parameters(tool);
            if schema.get("type").and_then(Value::as_str) != Some("object") {
                err(
                    format!("{at}.parameters"),
                    "must be a JSON Schema with \"type\": \"object\"".into(),
                );
            }
            match jsonschema::validator_for(&schema) {
                Ok(v) => {
                    validators.insert(tool.name.clone(), Arc::new(v));
                }
                Err(e) => err(
                    format!("{at}.parameters"),
                    format!("not a valid JSON Schema: {e}"),
                ),
            }
        }

        for (i, tool) in spec.tools.iter().enumerate() {
            if let Some(compensate) = &tool.compensate {
                check_compensate(
                    &spec.tools,
                    tool,
                    compensate,
                    &format!("tools[{i}]"),
                    &mut err,
                );
            }
        }
        for (i, tool) in spec.tools.iter().enumerate() {
            if let RequiresApproval::When(condition) = &tool.requires_approval {
                condition.check(&format!("tools[{i}].requires_approval.when"), &mut err);
            }
        }
        check_approvals(&spec.approvals, &mut err);

        for (i, turn) in spec.model.script.iter().enumerate() {
            if turn.content.is_none() && turn.tool_calls.is_empty() {
                err(
                    format!("model.script[{i}]"),
                    "needs `content` or `tool_calls`".into(),
                );
            }
        }

        if spec.limits.max_steps == 0 || spec.limits.max_steps > 10_000 {
            err(
                "limits.max_steps".into(),
                "must be between 1 and 10000".into(),
            );
        }
        if spec.limits.max_tokens_total == Some(0) {
            err(
                "limits.max_tokens_total".into(),
                "must be at least 1 (leave it out for no limit)".into(),
            );
        }
        if let Some(cost) = spec.limits.max_cost
            && !(cost.is_finite() && cost > 0.0)
        {
            err(
                "limits.max_cost".into(),
                format!("{cost} is not a budget (USD, more than 0; leave it out for no limit)"),
            );
        }
        if spec.limits.timeout.is_zero() {
            err("limits.timeout".into(), "must be positive".into());
        }
        if spec.limits.max_depth > 100 {
            err("limits.max_depth".into(), "must be at most 100".into());
        }
        if spec.limits.max_fan_out == 0 || spec.limits.max_fan_out > 1_000 {
            err(
                "limits.max_fan_out".into(),
                "must be between 1 and 1000".into(),
            );
        }
        if spec.limits.max_children == 0 || spec.limits.max_children > 100_000 {
            err(
                "limits.max_children".into(),
                "must be between 1 and 100000".into(),
            );
        }
        check_retry(&spec.retry, "retry", &mut err);

        let output = match &spec.output_schema {
            None => None,
            Some(schema) if !(schema.is_object() || schema.is_boolean()) => {
                err(
                    "output_schema".into(),
                    "must be a JSON Schema (an object)".into(),
                );
                None
            }
            Some(schema) => match jsonschema::validator_for(schema) {
                Ok(v) => Some(Arc::new(v)),
                Err(e) => {
                    err(
                        "output_schema".into(),
                        format!("not a valid JSON Schema: {e}"),
                    );
                    None
                }
            },
        };

        if errors.is_empty() {
            Ok(Agent {
                spec,
                validators,
                output,
                mcp: Vec::new(),
            })
        } else {
            Err(Error::Invalid(errors))
        }
    }

    /// The HTTP or built-in tool named `name`.
    pub fn tool(&self, name: &str) -> Option<&ToolSpec> {
        self.spec
            .tools
            .iter()
            .find(|t| t.mcp.is_none() && t.name == name)
    }

    /// The `builtin: spawn_agents` tool named `name`, if there is one.
    pub fn spawn_tool(&self, name: &str) -> Option<&ToolSpec> {
        self.tool(name)
            .filter(|t| t.builtin == Some(Builtin::SpawnAgents))
    }

    /// The agent name a `spawn_agents` task's `agent` stands for (`self`:
    /// this agent).
    pub fn spawned_name<'a>(&'a self, agent: &'a str) -> &'a str {
        if agent == SELF_AGENT {
            &self.spec.name
        } else {
            agent
        }
    }

    /// The queue of external workers that makes calls of `name`, if it is
    /// a `worker:` tool.
    pub fn queue_of(&self, name: &str) -> Option<&str> {
        self.tool(name).and_then(|t| t.worker.as_deref())
    }

    /// The spec entry whose policies (`requires_approval`, `idempotent`,
    /// `on_uncertain`) apply to calls of `name`: the tool declared inline
    /// by that name, or the `{mcp: <server>, ...}` entry of an MCP tool the
    /// model sees as `<server>__<tool>`.
    fn policies(&self, name: &str) -> Option<&ToolSpec> {
        self.tool(name).or_else(|| {
            // A server's name has no `__`: the first one ends it.
            let (server, _) = name.split_once("__")?;
            self.spec
                .tools
                .iter()
                .find(|t| t.mcp.as_deref() == Some(server))
        })
    }

    /// What undoes a successful call of `tool`, if it declares `compensate`.
    pub fn compensation(&self, tool: &str) -> Option<&Compensate> {
        self.tool(tool)?.compensate.as_ref()
    }

    /// Whether any tool declares `compensate` (else a failing run has
    /// nothing to undo).
    pub fn has_compensations(&self) -> bool {
        self.spec.tools.iter().any(|t| t.compensate.is_some())
    }

    /// The MCP servers the spec uses, each with its allow list.
    pub fn mcp_servers(&self) -> impl Iterator<Item = (&str, &[String])> {
        self.spec
            .tools
            .iter()
            .filter_map(|t| Some((t.mcp.as_deref()?, t.allow.as_slice())))
    }

    /// The resolved MCP tool the model calls `name`, if this agent may use it.
    pub fn mcp_tool(&self, name: &str) -> Option<&McpTool> {
        self.mcp.iter().find(|t| t.name == name)
    }

    /// This agent with the MCP tools it may use among `listed` (what its
    /// servers list): a tool is kept when the spec has an `mcp` entry for its
    /// server whose `allow` matches its name. Also returns, for the logs,
    /// the allowed tools left out and why: a name the model cannot be shown
    /// (`<server>__<tool>` must be 1-64 letters, digits, `_` or `-`), one
    /// taken already, or an input schema that does not compile.
    pub fn with_mcp_tools(&self, listed: &[McpTool]) -> (Agent, Vec<String>) {
        let mut agent = self.clone();
        agent.mcp.clear();
        agent.validators.retain(|name, _| self.tool(name).is_some());
        let mut skipped = Vec::new();
        for tool in listed {
            let allowed = self
                .mcp_servers()
                .any(|(server, allow)| server == tool.server && allows(allow, &tool.tool));
            if !allowed {
                continue;
            }
            if !is_tool_name(&tool.name) {
                skipped.push(format!(
                    "mcp tool `{}` of `{}`: `{}` is not a name a model can call (1-64 letters, digits, `_` or `-`)",
                    tool.tool, tool.server, tool.name
                ));
                continue;
            }
            if agent.validators.contains_key(&tool.name) {
                skipped.push(format!(
                    "mcp tool `{}` of `{}`: the name `{}` is taken",
                    tool.tool, tool.server, tool.name
                ));
                continue;
            }
            let mut schema = tool.parameters.clone();
            if schema.get("type").is_none()
                && let Value::Object(map) = &mut schema
            {
                map.insert("type".into(), Value::String("object".into()));
            }
            match jsonschema::validator_for(&schema) {
                Ok(v) => {
                    agent.validators.insert(tool.name.clone(), Arc::new(v));
                    agent.mcp.push(McpTool {
                        parameters: schema,
                        ..tool.clone()
                    });
                }
                Err(e) => skipped.push(format!(
                    "mcp tool `{}` of `{}`: its input schema does not compile: {e}",
                    tool.tool, tool.server
                )),
            }
        }
        (agent, skipped)
    }

    /// The tools offered to the model: the spec's HTTP tools and built-ins,
    /// then the resolved MCP tools.
    pub fn tools(&self) -> Vec<Offered> {
        let mut offered: Vec<Offered> = self
            .spec
            .tools
            .iter()
            .filter(|t| t.mcp.is_none())
            .map(|t| Offered {
                name: t.name.clone(),
                description: tool_description(t),
                parameters: tool_parameters(t),
            })
            .collect();
        offered.extend(self.mcp.iter().map(|t| Offered {
            name: t.name.clone(),
            description: t.description.clone(),
            parameters: t.parameters.clone(),
        }));
        offered
    }

    /// The names of the tools offered to the model.
    pub fn tool_names(&self) -> Vec<&str> {
        let fixed = self.spec.tools.iter().filter(|t| t.mcp.is_none());
        fixed
            .map(|t| t.name.as_str())
            .chain(self.mcp.iter().map(|t| t.name.as_str()))
            .collect()
    }

    /// Whether a call of `tool` with these (validated) arguments waits for
    /// a human decision: the tool's `requires_approval`, or a rule of
    /// `approvals.tools` matching its name and arguments.
    pub fn needs_approval(&self, tool: &str, arguments: &Value) -> bool {
        let inline = self
            .policies(tool)
            .is_some_and(|t| t.requires_approval.applies(arguments));
        inline
            || self
                .spec
                .approvals
                .tools
                .iter()
                .any(|rule| rule.applies(tool, arguments))
    }

    /// What recovery does with an uncertain call of `tool`: its
    /// `on_uncertain` (an MCP tool's: its server entry's), else `retry` for
    /// idempotent tools and built-ins (they only read), else `ask`.
    pub fn on_uncertain(&self, tool: &str) -> OnUncertain {
        match self.policies(tool) {
            Some(t) => t
                .on_uncertain
                .unwrap_or(if t.idempotent || t.builtin.is_some() {
                    OnUncertain::Retry
                } else {
                    OnUncertain::Ask
                }),
            None => OnUncertain::Ask,
        }
    }

    /// The system prompt sent first: the spec's, and with `output_schema`,
    /// what form the final answer must take.
    pub fn system_prompt(&self) -> Cow<'_, str> {
        let Some(schema) = &self.spec.output_schema else {
            return Cow::Borrowed(&self.spec.system);
        };
        let mut prompt = self.spec.system.clone();
        if !prompt.is_empty() {
            prompt.push_str("\n\n");
        }
        prompt.push_str(
            "When you give your final answer, answer with one JSON value only (no other text) that matches this JSON Schema:\n",
        );
        prompt.push_str(&schema.to_string());
        Cow::Owned(prompt)
    }

    /// Checks a final answer against `output_schema` (none: any text goes):
    /// the answer as it is kept (the JSON text, a code fence taken off), or
    /// what is wrong with it, for the model.
    pub fn check_output(&self, answer: &str) -> Result<String, String> {
        let Some(validator) = &self.output else {
            return Ok(answer.to_string());
        };
        let text = unfence(answer);
        let value: Value = serde_json::from_str(text).map_err(|e| {
            format!(
                "the final answer must be one JSON value matching the output schema, but it is not JSON ({e}): {}",
                clip(answer, 200)
            )
        })?;
        let problems = schema_problems(validator, &value);
        if problems.is_empty() {
            Ok(text.to_string())
        } else {
            Err(format!(
                "the final answer does not match the output schema: {}",
                problems.join("; ")
            ))
        }
    }

    /// Checks arguments the model wrote for a tool: they must be a JSON object
    /// that satisfies the tool's schema. The error is written for the model.
    pub fn check_arguments(&self, tool: &str, arguments: &str) -> Result<Value, String> {
        let Some(validator) = self.validators.get(tool) else {
            return Err(format!(
                "unknown tool `{tool}`; available tools: {}",
                self.tool_names().join(", ")
            ));
        };
        let text = if arguments.trim().is_empty() {
            "{}"
        } else {
            arguments
        };
        let value: Value = serde_json::from_str(text).map_err(|e| {
            format!(
                "arguments of `{tool}` are not valid JSON ({e}): {}",
                clip(arguments, 200)
            )
        })?;
        let problems = schema_problems(validator, &value);
        if problems.is_empty() {
            Ok(value)
        } else {
            Err(format!(
                "arguments of `{tool}` do not match its schema: {}",
                problems.join("; ")
            ))
        }
    }
}

/// How `value` fails `validator` (the first five ways, each at its
/// place), for the model to correct; empty when it matches.
fn schema_problems(validator: &jsonschema::Validator, value: &Value) -> Vec<String> {
    validator
        .iter_errors(value)
        .take(5)
        .map(|e| {
            let at = e.instance_path().to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{at}: {e}")
            }
        })
        .collect()
}

/// The JSON Schema of a tool's arguments (a built-in's own when not given).
pub fn tool_parameters(tool: &ToolSpec) -> Value {
    if let Some(p) = &tool.parameters {
        return p.clone();
    }
    match tool.builtin {
        Some(Builtin::ReadFile) => serde_json::json!({
            "type": "object",
            "properties": {"path": {"type": "string", "description": "file path relative to the tool's folder"}},
            "required": ["path"],
            "additionalProperties": false
        }),
        Some(Builtin::SpawnAgents) => serde_json::json!({
            "type": "object",
            "properties": {"tasks": {
                "type": "array",
                "minItems": 1,
                "description": "the child runs to start, all at once; the result lists their outcomes in this order",
                "items": {
                    "type": "object",
                    "properties": {
                        "agent": {"type": "string", "enum": tool.agents, "description": "the agent to run (`self`: this agent, on a sub-task)"},
                        "input": {"description": "the child's request: a string or any JSON"}
                    },
                    "required": ["agent", "input"],
                    "additionalProperties": false
                }
            }},
            "required": ["tasks"],
            "additionalProperties": false
        }),
        _ => serde_json::json!({"type": "object", "properties": {}}),
    }
}

/// The description of a tool shown to the model.
pub fn tool_description(tool: &ToolSpec) -> String {
    if !tool.description.is_empty() {
        return tool.description.clone();
    }
    match tool.builtin {
        Some(Builtin::ReadFile) => "Read a text file from the agent's data folder.".into(),
        Some(Builtin::ListFiles) => "List the files in the agent's data folder.".into(),
        Some(Builtin::SpawnAgents) => format!(
            "Start agents ({}) as child runs on sub-tasks, all at once, and wait until every one has finished; the result is a JSON array of their outcomes ({{agent, run_id, status, output or error}}) in the order of the tasks.",
            tool.agents.join(", ")
        ),
        None => String::new(),
    }
}

/// Cuts `text` to at most `max` bytes on a char boundary, marking the cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Reads a mapping into its type; a failure names the field at fault
/// (`(root)` for the whole value, with `not_a_mapping` when it is no mapping).
pub(crate) fn typed<T: serde::de::DeserializeOwned>(
    value: Value,
    not_a_mapping: &str,
) -> Result<T, Vec<FieldError>> {
    if !value.is_object() {
        return Err(vec![FieldError {
            field: "(root)".into(),
            message: not_a_mapping.into(),
        }]);
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(root)".to_string()
        } else {
            field
        };
        vec![FieldError {
            field,
            message: e.inner().to_string(),
        }]
    })
}

/// Checks one model (the spec's own, or a fallback at `at`).
fn check_model(m: &ModelSpec, at: &str, err: &mut impl FnMut(String, String)) {
    if m.model.trim().is_empty() {
        err(format!("{at}.model"), "must not be empty".into());
    }
    if let Some(url) = &m.base_url
        && !is_http_url(url)
    {
        err(
            format!("{at}.base_url"),
            format!("`{url}` is not an http(s) URL"),
        );
    }
    if let Some(t) = m.temperature
        && !(0.0..=2.0).contains(&t)
    {
        err(format!("{at}.temperature"), format!("{t} is outside 0..=2"));
    }
    if m.max_tokens == Some(0) {
        err(format!("{at}.max_tokens"), "must be at least 1".into());
    }
    // The value is not repeated: it may be the key, written here by mistake.
    if m.api_key_env
        .as_deref()
        .is_some_and(|env| !is_env_name(env))
    {
        err(
            format!("{at}.api_key_env"),
            "must name an environment variable (letters, digits, `_`), not hold the key".into(),
        );
    }
    if m.timeout.is_zero() {
        err(format!("{at}.timeout"), "must be positive".into());
    }
    if m.idle_timeout.is_some_and(|t| t.is_zero()) {
        err(format!("{at}.idle_timeout"), "must be positive".into());
    }
    match &m.provider {
        Provider::Scripted => {
            if m.script.is_empty() {
                err(
                    format!("{at}.script"),
                    "a scripted model needs at least one turn".into(),
                );
            }
        }
        Provider::Named(name) => {
            check_name(name, &format!("{at}.provider"), err);
            if !m.script.is_empty() {
                err(
                    format!("{at}.script"),
                    "only the scripted provider takes a script".into(),
                );
            }
        }
        Provider::Openai | Provider::Anthropic => {
            if !m.script.is_empty() {
                err(
                    format!("{at}.script"),
                    "only the scripted provider takes a script".into(),
                );
            }
        }
    }
    if m.provider == Provider::Anthropic
        && let Some(t) = m.temperature
        && t > 1.0
    {
        err(
            format!("{at}.temperature"),
            format!("{t} is outside 0..=1 (the Anthropic range)"),
        );
    }
}

/// The first place in a spec (`tools[0].description`, or `(root)`) whose
/// text holds U+0000: PostgreSQL cannot store it, so no store takes it.
fn nul_at(value: &Value, at: &str) -> Option<String> {
    let here = || {
        if at.is_empty() {
            "(root)".to_string()
        } else {
            at.to_string()
        }
    };
    match value {
        Value::String(text) if text.contains('\0') => Some(here()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| nul_at(item, &format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(key, item)| {
            let path = if at.is_empty() {
                key.clone()
            } else {
                format!("{at}.{key}")
            };
            if key.contains('\0') {
                return Some(path);
            }
            nul_at(item, &path)
        }),
        _ => None,
    }
}

/// Whether `value` is a name (of an agent, a version): 1-64 ASCII letters,
/// digits, `_`, `-` or `.`.
pub fn is_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

pub(crate) fn check_name(value: &str, field: &str, err: &mut impl FnMut(String, String)) {
    if !is_name(value) {
        err(
            field.into(),
            format!("`{value}` must be 1-64 letters, digits, `_`, `-` or `.`"),
        );
    }
}

/// Checks a `builtin: spawn_agents` tool: the agents it may start.
fn check_spawn(tool: &ToolSpec, own: &str, at: &str, err: &mut impl FnMut(String, String)) {
    if tool.agents.is_empty() {
        err(
            format!("{at}.agents"),
            "list the agents a call may start (registered agent names, `self` for this agent)"
                .into(),
        );
    }
    for (i, agent) in tool.agents.iter().enumerate() {
        let field = format!("{at}.agents[{i}]");
        check_name(agent, &field, err);
        if agent == own {
            err(
                field.clone(),
                format!("write `{SELF_AGENT}` for this agent"),
            );
        }
        if tool.agents[..i].contains(agent) {
            err(field, format!("`{agent}` is listed twice"));
        }
    }
    if tool.root.is_some() {
        err(
            format!("{at}.root"),
            "only file built-ins take a root".into(),
        );
    }
    if tool.parameters.is_some() {
        err(
            format!("{at}.parameters"),
            "spawn_agents has its own schema ({\"tasks\": [{\"agent\", \"input\"}]})".into(),
        );
    }
}

/// Checks `compensate` of the tool at `at`: it names a tool of the spec
/// (or an MCP tool its server entry allows) and its template's
/// placeholders parse.
fn check_compensate(
    tools: &[ToolSpec],
    tool: &ToolSpec,
    compensate: &Compensate,
    at: &str,
    err: &mut impl FnMut(String, String),
) {
    if tool.mcp.is_some() {
        err(
            format!("{at}.compensate"),
            "an `mcp` entry stands for many tools; declare `compensate` on a tool of its own"
                .into(),
        );
        return;
    }
    let name = compensate.tool.as_str();
    let inline = tools.iter().any(|t| t.mcp.is_none() && t.name == name);
    let mcp = name.split_once("__").is_some_and(|(server, tool)| {
        tools
            .iter()
            .any(|t| t.mcp.as_deref() == Some(server) && allows(&t.allow, tool))
    });
    if !inline && !mcp {
        let known: Vec<&str> = tools
            .iter()
            .filter(|t| t.mcp.is_none())
            .map(|t| t.name.as_str())
            .collect();
        err(
            format!("{at}.compensate.tool"),
            format!(
                "`{name}` is not a tool of this spec (tools: {}; an MCP tool is `<server>__<tool>`, allowed by its server's entry)",
                known.join(", ")
            ),
        );
    }
    if !compensate.arguments.is_object() {
        err(
            format!("{at}.compensate.arguments"),
            "must be a mapping (the arguments of the compensating call)".into(),
        );
    }
    crate::saga::check_template(
        &compensate.arguments,
        &format!("{at}.compensate.arguments"),
        err,
    );
}

/// Checks an `{mcp: <server>, allow: [...]}` entry (`earlier`: the entries before it).
fn check_mcp_entry(
    earlier: &[ToolSpec],
    tool: &ToolSpec,
    server: &str,
    at: &str,
    err: &mut impl FnMut(String, String),
) {
    if !crate::config::is_mcp_server_name(server) {
        err(
            format!("{at}.mcp"),
            format!("`{server}` must be 1-32 letters, digits, `_` or `-`, without `__`"),
        );
    }
    if earlier.iter().any(|t| t.mcp.as_deref() == Some(server)) {
        err(
            format!("{at}.mcp"),
            format!(
                "`{server}` is listed twice (one entry per server, with all its allowed tools)"
            ),
        );
    }
    let extra = [
        ("name", !tool.name.is_empty()),
        ("description", !tool.description.is_empty()),
        ("parameters", tool.parameters.is_some()),
        ("http", tool.http.is_some()),
        ("builtin", tool.builtin.is_some()),
        ("root", tool.root.is_some()),
        ("agents", !tool.agents.is_empty()),
    ];
    for (field, set) in extra {
        if set {
            err(
                format!("{at}.{field}"),
                "an `mcp` entry takes only `mcp`, `allow` and the call policies `requires_approval`, `idempotent`, `on_uncertain` (the server names and describes its tools)"
                    .into(),
            );
        }
    }
    if tool.allow.is_empty() {
        err(
            format!("{at}.allow"),
            "list the tools the model may use (`*` for all of them)".into(),
        );
    }
    for (j, pattern) in tool.allow.iter().enumerate() {
        let ok = !pattern.is_empty()
            && pattern.len() <= 128
            && pattern
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '*'));
        if !ok {
            err(
                format!("{at}.allow[{j}]"),
                format!("`{pattern}` must be a tool name, `*` matching any run of characters"),
            );
        }
    }
}

/// The longest queue name of a `worker:` tool.
pub const MAX_QUEUE_NAME: usize = 100;

/// Whether `name` can name an external workers' queue: 1 to
/// [`MAX_QUEUE_NAME`] letters, digits, `_`, `-` or `.`.
pub fn is_queue_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_QUEUE_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn check_worker(tool: &ToolSpec, queue: &str, at: &str, err: &mut impl FnMut(String, String)) {
    if tool.http.is_some() || tool.builtin.is_some() {
        err(
            at.to_string(),
            "set one of `http`, `builtin` or `worker`, not several".into(),
        );
    }
    if !is_queue_name(queue) {
        err(
            format!("{at}.worker"),
            format!(
                "`{queue}` must be 1-{MAX_QUEUE_NAME} letters, digits, `_`, `-` or `.` (the queue external workers lease from)"
            ),
        );
    }
    if tool.root.is_some() {
        err(
            format!("{at}.root"),
            "only file built-ins take a root".into(),
        );
    }
}

fn check_approvals(approvals: &Approvals, err: &mut impl FnMut(String, String)) {
    for (i, rule) in approvals.tools.iter().enumerate() {
        let at = format!("approvals.tools[{i}]");
        let pattern_ok = !rule.tool.is_empty()
            && rule.tool.len() <= 128
            && rule
                .tool
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '*'));
        if !pattern_ok {
            err(
                format!("{at}.tool"),
                format!(
                    "`{}` is not a tool-name pattern (letters, digits, `_`, `-`, `.` and `*`)",
                    rule.tool
                ),
            );
        }
        if let Some(condition) = &rule.when {
            condition.check(&format!("{at}.when"), err);
        }
    }
    if approvals.timeout.is_some_and(|t| t.is_zero()) {
        err("approvals.timeout".into(), "must be positive".into());
    }
    if approvals.on_timeout == OnTimeout::Escalate && approvals.timeout.is_none() {
        err(
            "approvals.on_timeout".into(),
            "escalate needs approvals.timeout (when to escalate)".into(),
        );
    }
    for (field, url) in [
        ("approvals.notify", &approvals.notify),
        ("approvals.escalate_to", &approvals.escalate_to),
    ] {
        if let Some(url) = url
            && !is_http_url(url)
        {
            err(field.into(), format!("`{url}` is not an http(s) URL"));
        }
    }
}

fn check_retry(retry: &RetryPolicy, at: &str, err: &mut impl FnMut(String, String)) {
    if retry.max_attempts == 0 || retry.max_attempts > 100 {
        err(
            format!("{at}.max_attempts"),
            "must be between 1 and 100".into(),
        );
    }
    let b = &retry.backoff;
    if b.initial.is_zero() {
        err(format!("{at}.backoff.initial"), "must be positive".into());
    }
    if b.max < b.initial {
        err(
            format!("{at}.backoff.max"),
            "must be at least backoff.initial".into(),
        );
    }
    if !(1.0..=10.0).contains(&b.multiplier) {
        err(
            format!("{at}.backoff.multiplier"),
            "must be between 1 and 10".into(),
        );
    }
}

fn is_tool_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `url` is an absolute http(s) URL with a host.
pub fn is_http_url(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"));
    matches!(rest, Some(r) if !r.is_empty() && !r.starts_with('/') && !r.contains(char::is_whitespace))
}

/// `url` fit for a log line or an error message, whether it parses or not:
/// its user info cut after the user name (`user:***@`; a user name alone,
/// which may be a token, as `***@`), every query value as `***`, no
/// fragment. A password holding `/`, `?`, `#` or `@` (not valid in a URL,
/// but written) is hidden all the same.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return redact_query(url);
    };
    let (userinfo, rest) = split_userinfo(rest);
    let mut out = format!("{scheme}://");
    match userinfo.map(|u| u.split_once(':')) {
        Some(Some((user, _))) => {
            out.push_str(user);
            out.push_str(":***@");
        }
        Some(None) => out.push_str("***@"),
        None => {}
    }
    out.push_str(&redact_query(rest));
    out
}

/// The user info at the start of what follows a URL's `://`, if any, and
/// the rest.
fn split_userinfo(rest: &str) -> (Option<&str>, &str) {
    let Some(at) = rest.find('@') else {
        return (None, rest);
    };
    if let Some(slash) = rest[..at].find('/') {
        // A path holding `@` (`/@scope/name`), unless what precedes the
        // slash is `user:password`, not `host:port`.
        let port = rest[..slash].rsplit_once(':').map(|(_, port)| port);
        if !port.is_some_and(|p| p.chars().any(|c| !c.is_ascii_digit())) {
            return (None, rest);
        }
    }
    let end = rest[at..].find('/').map_or(rest.len(), |i| at + i);
    let last = rest[..end].rfind('@').unwrap_or(at);
    (Some(&rest[..last]), &rest[last + 1..])
}

/// `text` without its fragment and with every query value as `***` (a
/// parameter without a value, which may be a token, as `***`).
fn redact_query(text: &str) -> String {
    let text = text.split('#').next().unwrap_or_default();
    let Some((base, query)) = text.split_once('?') else {
        return text.to_string();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) => format!("{name}=***"),
            None if pair.is_empty() => String::new(),
            None => "***".to_string(),
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

/// Checks that every `${...}` in a header value names an environment variable.
fn check_secret_refs(value: &str) -> Result<(), String> {
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unclosed `${` (write `${ENV_VAR}`)".into());
        };
        let name = &after[..end];
        if !is_env_name(name) {
            return Err(format!(
                "`${{{name}}}` does not name an environment variable"
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// The error of a credential written out in a spec.
fn literal_credential(what: &str) -> String {
    format!(
        "{what} carries a credential: write it as `${{ENV_VAR}}` (read from the server's environment at call time), so it never enters the store, the API or a log"
    )
}

/// The part of an HTTP tool's URL that holds a credential written out
/// rather than taken from the environment (`${VAR}`): a password in the
/// user info, or a query parameter named like one (`api_key`, `token`,
/// `client_secret`, `sig` …) with a literal value. A value filled from the
/// model's arguments (`{arg}`) is not the server's secret.
fn literal_url_secret(url: &str) -> Option<String> {
    let literal = |value: &str| {
        let placeholder = value.len() > 2 && value.starts_with('{') && value.ends_with('}');
        !value.is_empty() && !value.contains("${") && !placeholder
    };
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    if let (Some(userinfo), _) = split_userinfo(rest)
        && let Some((_, password)) = userinfo.split_once(':')
        && literal(password)
    {
        return Some("the URL's password".into());
    }
    let query = rest.split_once('?')?.1;
    let query = query.split_once('#').map_or(query, |(query, _)| query);
    query.split('&').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (is_secret_parameter(name) && literal(value)).then(|| format!("query parameter `{name}`"))
    })
}

/// Whether a query parameter's name may carry a secret: any name holding
/// key, token, secret, pass, auth, sig or credential. Broad, for
/// redaction (a tool's answer never shows such a value; a false alarm
/// costs nothing); [`is_secret_parameter`] is the narrow rule a spec is
/// refused by.
pub fn may_name_secret(name: &str) -> bool {
    const PARTS: [&str; 7] = [
        "key",
        "token",
        "secret",
        "pass",
        "auth",
        "sig",
        "credential",
    ];
    let name = name.to_ascii_lowercase();
    PARTS.iter().any(|part| name.contains(part))
}

/// Whether a query parameter's name says it carries a credential, so that
/// a spec writing its value out is refused. Narrower than
/// [`may_name_secret`]: `keyword` or `sort_key` must stay usable.
fn is_secret_parameter(name: &str) -> bool {
    let name: String = name
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    const NAMES: [&str; 10] = [
        "key",
        "pass",
        "passwd",
        "pwd",
        "auth",
        "sig",
        "signature",
        "credential",
        "credentials",
        "privatekey",
    ];
    NAMES.contains(&name.as_str())
        || ["apikey", "token", "secret", "password"]
            .iter()
            .any(|end| name.ends_with(end))
}

/// Whether a header's name says it carries a credential, whose value a
/// spec must then take from the environment (`${VAR}`), never write out.
fn is_credential_header(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    matches!(
        name.as_str(),
        "authorization" | "proxy-authorization" | "cookie"
    ) || [
        "token", "secret", "password", "api-key", "api_key", "apikey", "auth",
    ]
    .iter()
    .any(|word| name.contains(word))
}

/// An answer without the Markdown code fence models like to put around
/// JSON (```` ```json … ``` ````), trimmed.
fn unfence(answer: &str) -> &str {
    let text = answer.trim();
    let Some(rest) = text.strip_prefix("```") else {
        return text;
    };
    let Some(body) = rest.strip_suffix("```") else {
        return text;
    };
    // The info string (`json`) runs to the first line break.
    match body.split_once('\n') {
        Some((info, inner)) if !info.contains('{') && !info.contains('[') => inner.trim(),
        _ => body.trim(),
    }
}

/// The names of the `${VAR}` references in `text` (as written; checked
/// by validation to be variable names).
pub(crate) fn env_refs(text: &str) -> impl Iterator<Item = &str> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
}

/// Replaces each `${VAR}` in `value` using `lookup`; names a missing variable.
pub fn expand_secrets(
    value: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unclosed `${`".into());
        };
        let name = &after[..end];
        match lookup(name) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!(
                    "environment variable `{name}` is not set on the server"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<String> {
        match Agent::parse(text) {
            Ok(_) => Vec::new(),
            Err(Error::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn a_key_written_as_api_key_env_is_not_repeated() {
        let spec =
            "name: a\nversion: 1\nmodel: {provider: openai, model: m, api_key_env: sk-live-123}\n";
        let Err(e) = Agent::parse(spec) else {
            panic!("a key in api_key_env is refused");
        };
        assert_eq!(fields(spec), ["model.api_key_env"]);
        assert!(!e.to_string().contains("sk-live-123"), "{e}");
    }

    #[test]
    fn credentials_in_tool_headers_come_from_the_environment() {
        let spec = |headers: &str| {
            format!(
                "name: a\nversion: 1\nmodel: {{provider: scripted, model: m, script: [{{content: hi}}]}}\n\
                 tools:\n  - name: t\n    description: d\n    parameters: {{type: object}}\n    \
                 http: {{url: 'https://h/x', headers: {headers}}}\n"
            )
        };
        for literal in [
            "{Authorization: 'Bearer sk-live-123'}",
            "{x-api-key: sk-live-123}",
            "{X-Auth-Token: sk-live-123}",
            "{Cookie: 'session=sk-live-123'}",
        ] {
            let text = spec(literal);
            let Err(e) = Agent::parse(&text) else {
                panic!("{literal} is refused");
            };
            assert_eq!(fields(&text).len(), 1, "{literal}: {:?}", fields(&text));
            assert!(
                fields(&text)[0].starts_with("tools[0].http.headers."),
                "{literal}"
            );
            assert!(e.to_string().contains("${ENV_VAR}"), "{e}");
            assert!(!e.to_string().contains("sk-live-123"), "{e}");
        }
        for fine in [
            "{Authorization: 'Bearer ${TOKEN}'}",
            "{x-api-key: '${KEY}'}",
            "{Accept: application/json, X-Request-Source: keel}",
        ] {
            assert_eq!(fields(&spec(fine)), Vec::<String>::new(), "{fine}");
        }
    }

    #[test]
    fn credentials_in_tool_urls_come_from_the_environment() {
        let spec = |url: &str| {
            format!(
                "name: a\nversion: 1\nmodel: {{provider: scripted, model: m, script: [{{content: hi}}]}}\n\
                 tools:\n  - name: t\n    description: d\n    parameters: {{type: object}}\n    \
                 http: {{url: '{url}'}}\n"
            )
        };
        for literal in [
            "https://h/x?api_key=sk-live-123",
            "https://h/x?q=1&access_token=sk-live-123#top",
            "https://h/x?Client-Secret=sk-live-123",
            "https://h/x?key=sk-live-123",
            "https://h/x?sig=sk-live-123",
            "https://bot:sk-live-123@h/x",
        ] {
            let text = spec(literal);
            let Err(e) = Agent::parse(&text) else {
                panic!("{literal} is refused");
            };
            assert_eq!(fields(&text), ["tools[0].http.url"], "{literal}");
            assert!(e.to_string().contains("${ENV_VAR}"), "{e}");
            assert!(!e.to_string().contains("sk-live-123"), "{e}");
        }
        assert_eq!(
            fields(&spec("https://h/x?key=${OPEN")),
            ["tools[0].http.url"]
        );
        assert_eq!(
            fields(&spec("https://h/x?key=${not a var}")),
            ["tools[0].http.url"]
        );
        for fine in [
            "https://h/x?api_key=${SEARCH_KEY}",
            "https://bot:${BOT_PASSWORD}@h/x",
            "https://h/{id}?token={token}&keyword=rust&sort_key=date",
            "https://h/x?key=",
            "https://user@h/x",
        ] {
            assert_eq!(fields(&spec(fine)), Vec::<String>::new(), "{fine}");
        }
    }

    #[test]
    fn output_schemas_are_checked_and_answers_unfenced() {
        let base =
            "name: a\nversion: 1\nmodel: {provider: scripted, model: m, script: [{content: hi}]}\n";
        assert_eq!(
            fields(&format!("{base}output_schema: 5\n")),
            ["output_schema"]
        );
        assert_eq!(
            fields(&format!("{base}output_schema: {{type: nonsense}}\n")),
            ["output_schema"]
        );
        let plain = Agent::parse(base).expect("valid");
        assert_eq!(plain.check_output("any text"), Ok("any text".to_string()));
        assert_eq!(plain.system_prompt(), "");
        let agent = Agent::parse(&format!(
            "{base}system: Be brief.\noutput_schema: {{type: array, items: {{type: integer}}}}\n"
        ))
        .expect("valid");
        assert!(agent.system_prompt().starts_with("Be brief.\n\n"));
        assert!(
            agent
                .system_prompt()
                .ends_with(r#"{"items":{"type":"integer"},"type":"array"}"#)
        );
        for (answer, kept) in [
            ("[1, 2]", "[1, 2]"),
            ("  [1]\n", "[1]"),
            ("```json\n[3]\n```", "[3]"),
            ("```\n[4]\n```", "[4]"),
            ("```[5]```", "[5]"),
        ] {
            assert_eq!(agent.check_output(answer), Ok(kept.to_string()), "{answer}");
        }
        let prose = agent.check_output("Here: [1]").expect_err("prose");
        assert!(prose.contains("not JSON"), "{prose}");
        let wrong = agent.check_output(r#"[1, "two"]"#).expect_err("a string");
        assert!(wrong.contains("/1"), "{wrong}");
    }

    #[test]
    fn urls_are_shown_without_secrets() {
        for (url, shown) in [
            (
                "postgres://keel:pw@db:5432/keel",
                "postgres://keel:***@db:5432/keel",
            ),
            ("postgres://keel@db/keel", "postgres://***@db/keel"),
            (
                "postgres://db/keel?sslmode=require&password=pw",
                "postgres://db/keel?sslmode=***&password=***",
            ),
            (
                "postgres://k:a/b?c#d@e@db:1/k?x=1#frag",
                "postgres://k:***@db:1/k?x=***",
            ),
            ("nats://tok@n1:4222", "nats://***@n1:4222"),
            (
                "https://api.example.com/v1/items?api_key=k&",
                "https://api.example.com/v1/items?api_key=***&",
            ),
            ("https://h/x?token", "https://h/x?***"),
            (
                "https://registry.example.com/@scope/pkg",
                "https://registry.example.com/@scope/pkg",
            ),
            ("https://h:8443/@me", "https://h:8443/@me"),
            ("https://u:p@h/a@b", "https://u:***@h/a@b"),
            ("not a url?secret=s", "not a url?secret=***"),
            ("https://h/p#access_token=t", "https://h/p"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn anthropic_models_and_idle_timeouts() {
        let agent = Agent::parse(
            "name: a\nversion: 1\nmodel: {provider: anthropic, model: claude-x, idle_timeout: 90s, temperature: 1}\n",
        )
        .unwrap();
        let model = &agent.spec.model;
        assert_eq!(model.provider, Provider::Anthropic);
        assert_eq!(model.idle_timeout, Some(Duration::from_secs(90)));
        let json = serde_json::to_value(&agent.spec).unwrap();
        assert_eq!(json["model"]["provider"], "anthropic");
        assert_eq!(json["model"]["idle_timeout"], "90s");

        // Unset, it is not written: specs stored before it existed compare equal.
        let agent =
            Agent::parse("name: a\nversion: 1\nmodel: {provider: openai, model: m}\n").unwrap();
        assert_eq!(agent.spec.model.idle_timeout, None);
        let json = serde_json::to_value(&agent.spec).unwrap();
        assert!(json["model"].get("idle_timeout").is_none());

        assert_eq!(
            fields(
                "name: a\nversion: 1\nmodel: {provider: anthropic, model: m, temperature: 1.5, idle_timeout: 0s}\n"
            ),
            vec!["model.idle_timeout", "model.temperature"]
        );
        assert_eq!(
            fields("name: a\nversion: 1\nmodel: {provider: openai, model: m, temperature: 1.5}\n"),
            Vec::<String>::new(),
            "OpenAI takes up to 2"
        );
        assert_eq!(
            fields(
                "name: a\nversion: 1\nmodel: {provider: anthropic, model: m, script: [{content: hi}]}\n"
            ),
            vec!["model.script"]
        );
    }

    #[test]
    fn streaming_is_a_model_flag() {
        let agent = Agent::parse(
            "name: a\nversion: 1\nmodel: {provider: openai, model: m, stream: true}\n",
        )
        .unwrap();
        assert!(agent.spec.model.stream);
        let json = serde_json::to_value(&agent.spec).unwrap();
        assert_eq!(json["model"]["stream"], true);

        // Off by default, and then not written.
        let agent =
            Agent::parse("name: a\nversion: 1\nmodel: {provider: openai, model: m}\n").unwrap();
        assert!(!agent.spec.model.stream);
        let json = serde_json::to_value(&agent.spec).unwrap();
        assert!(json["model"].get("stream").is_none());

        assert_eq!(
            fields("name: a\nversion: 1\nmodel: {provider: openai, model: m, stream: maybe}\n"),
            vec!["model.stream"]
        );
    }

    #[test]
    fn mcp_entries_allow_tools_by_pattern() {
        let agent = Agent::parse(
            r#"
name: a
version: 1
model: {provider: scripted, model: s, script: [{content: hi}]}
tools:
  - {name: lookup, http: {url: "http://h/x"}}
  - {mcp: github, allow: [create_issue, list_*]}
  - {mcp: files, allow: ["*"]}
"#,
        )
        .unwrap();
        assert_eq!(
            agent.mcp_servers().collect::<Vec<_>>(),
            [
                ("github", &["create_issue".to_string(), "list_*".into()][..]),
                ("files", &["*".to_string()][..])
            ]
        );
        // Unresolved, only the HTTP tool is offered.
        assert_eq!(agent.tool_names(), ["lookup"]);
        assert!(agent.tool("").is_none());
        let json = serde_json::to_value(&agent.spec).unwrap();
        assert_eq!(json["tools"][1]["mcp"], "github");

        let schema = serde_json::json!({"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]});
        let listed = [
            McpTool::new(
                "github",
                "create_issue",
                "Opens an issue.".into(),
                schema.clone(),
            ),
            McpTool::new(
                "github",
                "list_repos",
                String::new(),
                serde_json::json!({"properties": {}}),
            ),
            McpTool::new("github", "delete_repo", String::new(), schema.clone()),
            McpTool::new("github", "list_with.dot", String::new(), schema.clone()),
            McpTool::new(
                "github",
                "list_bad",
                String::new(),
                serde_json::json!({"type": "object", "properties": {"x": {"type": 5}}}),
            ),
            McpTool::new("other", "create_issue", String::new(), schema.clone()),
            McpTool::new("files", "read", String::new(), schema.clone()),
        ];
        let (resolved, skipped) = agent.with_mcp_tools(&listed);
        assert_eq!(
            resolved.tool_names(),
            [
                "lookup",
                "github__create_issue",
                "github__list_repos",
                "files__read"
            ]
        );
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[0].contains("list_with.dot"), "{skipped:?}");
        assert!(skipped[1].contains("list_bad"), "{skipped:?}");
        let offered = resolved.tools();
        assert_eq!(offered[1].description, "Opens an issue.");
        assert_eq!(
            offered[2].parameters["type"], "object",
            "a missing type is object"
        );
        assert_eq!(
            resolved.mcp_tool("github__create_issue").unwrap().tool,
            "create_issue"
        );
        assert!(resolved.mcp_tool("github__delete_repo").is_none());

        // Arguments are checked against the server's schema; a tool not allowed is unknown.
        assert!(
            resolved
                .check_arguments("github__create_issue", r#"{"title": "x"}"#)
                .is_ok()
        );
        let error = resolved
            .check_arguments("github__create_issue", "{}")
            .unwrap_err();
        assert!(
            error.contains("do not match its schema") && error.contains("title"),
            "{error}"
        );
        let error = resolved
            .check_arguments("github__delete_repo", "{}")
            .unwrap_err();
        assert!(
            error.starts_with("unknown tool `github__delete_repo`"),
            "{error}"
        );
        // Resolving again starts over (a tool gone from the list is gone).
        let (again, _) = resolved.with_mcp_tools(&listed[..1]);
        assert_eq!(again.tool_names(), ["lookup", "github__create_issue"]);
        assert!(again.check_arguments("github__list_repos", "{}").is_err());
    }

    #[test]
    fn mcp_entry_errors_name_the_field() {
        let spec = |tools: &str| {
            format!("name: a\nversion: 1\nmodel: {{provider: openai, model: m}}\ntools:\n{tools}")
        };
        assert_eq!(
            fields(&spec(
                "  - {mcp: gh}\n  - {mcp: gh, allow: [x], name: n, http: {url: 'http://h'}}\n  - {mcp: 'a b', allow: ['', 'x y']}\n  - {name: t, builtin: list_files, root: /r, allow: [x]}\n"
            )),
            [
                "tools[0].allow",
                "tools[1].mcp",
                "tools[1].name",
                "tools[1].http",
                "tools[2].mcp",
                "tools[2].allow[0]",
                "tools[2].allow[1]",
                "tools[3].allow"
            ]
        );
    }

    #[test]
    fn worker_tools_name_a_queue() {
        let spec = |tools: &str| {
            format!("name: a\nversion: 1\nmodel: {{provider: openai, model: m}}\ntools:\n{tools}")
        };
        let agent = Agent::parse(&spec(
            "  - {name: resize, description: d, worker: images.v1, parameters: {type: object}}\n",
        ))
        .unwrap();
        assert_eq!(agent.queue_of("resize"), Some("images.v1"));
        assert_eq!(agent.queue_of("other"), None);
        assert!(agent.tools().iter().any(|t| t.name == "resize"));
        assert_eq!(
            fields(&spec(
                "  - {name: a, worker: 'a b'}\n  - {name: b, worker: q, http: {url: 'http://h'}}\n  - {name: c, worker: q, root: /r}\n  - {name: d}\n"
            )),
            ["tools[0].worker", "tools[1]", "tools[2].root", "tools[3]"]
        );
    }

    #[test]
    fn only_spawn_agents_takes_on_dead_letter() {
        let spec = |tools: &str| {
            format!("name: a\nversion: 1\nmodel: {{provider: openai, model: m}}\ntools:\n{tools}")
        };
        let agent = Agent::parse(&spec(
            "  - {name: fan, builtin: spawn_agents, agents: [self], on_dead_letter: wait}\n",
        ))
        .unwrap();
        assert_eq!(
            agent.spawn_tool("fan").and_then(|t| t.on_dead_letter),
            Some(OnDeadLetter::Wait)
        );
        assert_eq!(
            fields(&spec("  - {name: r, worker: q, on_dead_letter: wait}\n")),
            ["tools[0].on_dead_letter"]
        );
        assert_eq!(
            fields(&spec(
                "  - {name: f, builtin: spawn_agents, agents: [self], on_dead_letter: later}\n"
            )),
            ["tools[0].on_dead_letter"]
        );
    }

    #[test]
    fn compensate_names_a_known_tool_and_a_valid_template() {
        let spec = |tools: &str| {
            format!("name: a\nversion: 1\nmodel: {{provider: openai, model: m}}\ntools:\n{tools}")
        };
        let book = "  - {name: book, http: {url: 'http://h/book'}, compensate: {tool: %s, arguments: %a}}\n";
        let tools = |target: &str, arguments: &str| {
            let mut t = book.replace("%s", target).replace("%a", arguments);
            t.push_str("  - {name: unbook, http: {url: 'http://h/unbook'}}\n");
            t.push_str("  - {mcp: gh, allow: ['close_*'], compensate: {tool: unbook}}\n");
            t
        };
        assert_eq!(
            fields(&spec(&tools("cancel", "{id: '{{result.id}}'}"))),
            ["tools[0].compensate.tool", "tools[2].compensate"]
        );
        assert_eq!(
            fields(&spec(&tools("gh__open_issue", "{id: '{{run.id}}'}"))),
            [
                "tools[0].compensate.tool",
                "tools[0].compensate.arguments.id",
                "tools[2].compensate"
            ]
        );
        assert_eq!(
            fields(&spec(&tools("unbook", "[1]"))),
            ["tools[0].compensate.arguments", "tools[2].compensate"]
        );
        // A tool of the spec, or an MCP tool its server entry allows.
        for target in ["unbook", "gh__close_issue"] {
            let text = spec(&tools(
                target,
                "{id: '{{result.id}}', n: '{{call.arguments.n}}'}",
            ))
            .replace(", compensate: {tool: unbook}", "");
            let agent = Agent::parse(&text).unwrap();
            assert_eq!(
                agent.compensation("book").map(|c| c.tool.as_str()),
                Some(target)
            );
            assert!(agent.compensation("unbook").is_none());
            assert!(agent.has_compensations());
        }
    }

    #[test]
    fn allow_patterns() {
        let allow = |patterns: &[&str], name: &str| {
            let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
            allows(&patterns, name)
        };
        assert!(allow(&["create_issue"], "create_issue"));
        assert!(!allow(&["create_issue"], "create_issues"));
        assert!(allow(&["list_*"], "list_repos"));
        assert!(allow(&["list_*"], "list_"));
        assert!(!allow(&["list_*"], "get_list_x"));
        assert!(allow(&["*"], "anything"));
        assert!(allow(&["*_issue"], "close_issue"));
        assert!(allow(&["a*b*c"], "aXbYc"));
        assert!(!allow(&["a*b*c"], "aXbY"));
        assert!(!allow(&["ab*ba"], "aba"));
        assert!(!allow(&[], "x"));
    }

    #[test]
    fn approval_policies_are_validated_and_round_trip() {
        let text = r#"
name: a
version: 1
model: {provider: openai, model: m}
tools:
  - name: transfer
    http: {url: "http://x/t"}
    requires_approval: {when: {path: /amount, gt: 100}}
    on_uncertain: fail
  - name: lookup
    http: {url: "http://x/l"}
    idempotent: true
  - name: mail
    http: {url: "http://x/m"}
approvals:
  tools: ["delete_*", {tool: "github_*", when: {path: /branch, eq: main}}]
  timeout: 30m
  on_timeout: escalate
  notify: "https://hooks.example.com/keel"
"#;
        let agent = Agent::parse(text).unwrap();
        assert!(agent.needs_approval("transfer", &serde_json::json!({"amount": 101})));
        assert!(!agent.needs_approval("transfer", &serde_json::json!({"amount": 100})));
        assert!(agent.needs_approval("delete_repo", &serde_json::json!({})));
        assert!(agent.needs_approval("github_push", &serde_json::json!({"branch": "main"})));
        assert!(!agent.needs_approval("github_push", &serde_json::json!({"branch": "dev"})));
        assert!(!agent.needs_approval("lookup", &serde_json::json!({})));
        assert_eq!(agent.on_uncertain("transfer"), OnUncertain::Fail);
        assert_eq!(agent.on_uncertain("lookup"), OnUncertain::Retry);
        assert_eq!(agent.on_uncertain("mail"), OnUncertain::Ask);
        assert_eq!(agent.on_uncertain("not_declared"), OnUncertain::Ask);
        // An MCP tool follows its server entry's policies.
        let agent = Agent::parse(
            "name: a\nversion: 1\nmodel: {provider: openai, model: m}\ntools:\n  - {mcp: gh, allow: [list_*], on_uncertain: retry}\n  - {mcp: pay, allow: [\"*\"], requires_approval: true}\n",
        )
        .unwrap();
        assert_eq!(agent.on_uncertain("gh__list_issues"), OnUncertain::Retry);
        assert_eq!(agent.on_uncertain("pay__refund"), OnUncertain::Ask);
        assert!(agent.needs_approval("pay__refund", &serde_json::json!({})));
        assert!(!agent.needs_approval("gh__list_issues", &serde_json::json!({})));
        // Stored as JSON and read back, it is the same spec.
        let json = serde_json::to_value(&agent.spec).unwrap();
        let again = Agent::from_value(json).unwrap();
        assert_eq!(again.spec, agent.spec);
        // Without approvals nothing is written.
        let plain =
            Agent::parse("name: a\nversion: 1\nmodel: {provider: openai, model: m}\n").unwrap();
        let json = serde_json::to_value(&plain.spec).unwrap();
        assert!(json.get("approvals").is_none());

        let bad = r#"
name: a
version: 1
model: {provider: openai, model: m}
tools:
  - name: t
    http: {url: "http://x/t"}
    requires_approval: {when: {path: amount, gt: 1}}
approvals:
  tools: ["bad pattern", {tool: "x", when: {path: /a}}]
  timeout: 0s
  notify: "ftp://x"
"#;
        assert_eq!(
            fields(bad),
            vec![
                "tools[0].requires_approval.when.path",
                "approvals.tools[0].tool",
                "approvals.tools[1].when",
                "approvals.timeout",
                "approvals.notify",
            ]
        );
        assert_eq!(
            fields(
                "name: a\nversion: 1\nmodel: {provider: openai, model: m}\napprovals: {on_timeout: escalate}\n"
            ),
            vec!["approvals.on_timeout"]
        );
        assert_eq!(
            fields(
                "name: a\nversion: 1\nmodel: {provider: openai, model: m}\ntools: [{name: t, http: {url: \"http://x\"}, on_uncertain: maybe}]\n"
            ),
            vec!["tools[0].on_uncertain"]
        );
    }

    #[test]
    fn the_example_specs_are_valid() {
        for (file, text) in [
            (
                "demo.yaml",
                include_str!("../../../examples/agents/demo.yaml"),
            ),
            (
                "openai.yaml",
                include_str!("../../../examples/agents/openai.yaml"),
            ),
            (
                "anthropic.yaml",
                include_str!("../../../examples/agents/anthropic.yaml"),
            ),
        ] {
            if let Err(e) = Agent::parse(text) {
                panic!("examples/agents/{file}: {e}");
            }
        }
    }
}
