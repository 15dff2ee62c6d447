//! The server's configuration file (`keel serve --config keel.yaml`): the
//! LLM providers, configured once for every agent. An agent names a
//! provider and a model; the endpoint, the key, the rate limits, the
//! circuit breaker and the prices live here, so agents never hold keys.
//!
//! ```yaml
//! providers:
//!   openai:                          # what agents write in model.provider
//!     kind: openai                   # wire protocol: openai | anthropic
//!     base_url: https://api.openai.com/v1
//!     api_key_env: OPENAI_API_KEY    # or api_key_file: /run/secrets/openai
//!     timeout: 60s                   # ceiling of one call, whole answer
//!     breaker: {failures: 5, open_for: 30s}
//!     models:
//!       gpt-4o:
//!         rpm: 600                   # requests per minute, all processes together
//!         tpm: 150000                # tokens per minute (input + output)
//!         price: {input: 2.50, output: 10.00}   # USD per million tokens
//! ```
//!
//! And the MCP servers agents may use tools of (`tools: [{mcp: github,
//! allow: [create_issue, list_*]}]` in a spec):
//!
//! ```yaml
//! mcp_servers:
//!   github:
//!     stdio:                         # Keel spawns and supervises the process
//!       command: github-mcp-server
//!       args: [stdio]
//!       env:                         # its whole environment (nothing else is inherited)
//!         GITHUB_TOKEN: ${GITHUB_TOKEN}          # from Keel's environment
//!         OTHER: ${file:/run/secrets/other}      # or from a file
//!     timeout: 30s                   # one call; also the handshake
//!     refresh: 5m                    # tool list re-read at least this often
//!   search:
//!     http:                          # streamable HTTP
//!       url: https://mcp.example.com/mcp
//!       headers: {Authorization: "Bearer ${SEARCH_TOKEN}"}
//! ```
//!
//! Parsing is strict (unknown fields are errors) and validation names the
//! field at fault, as for agent specs. This module only says where a key
//! comes from ([`ProviderConfig::key_source`], [`expand`]); the engine reads
//! it when a call (or a spawn) needs it, so a rotated key file takes effect
//! without a restart and a provider no agent uses needs no key.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::DEFAULT_TENANT;
use crate::spec::{
    Builtin, FieldError, Provider, Spec, check_name, env_refs, human_duration, is_env_name,
    is_http_url, typed,
};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The text is not valid YAML or JSON.
    #[error("configuration is not valid YAML/JSON: {0}")]
    Syntax(String),
    /// One or more fields are missing, unknown or invalid.
    #[error("invalid configuration: {}", join(.0))]
    Invalid(Vec<FieldError>),
}

fn join(errors: &[FieldError]) -> String {
    let parts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

/// The whole file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// LLM providers by the name agents use in `model.provider`.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// MCP servers by the name agents use in `tools: [{mcp: <name>}]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub mcp_servers: BTreeMap<String, McpServerConfig>,
    /// Tenants by name, each with the API tokens that act as it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, TenantConfig>,
}

/// A tenant: its own agents, runs, dead letters, approvals, usage and
/// external-worker queues, reached with its own API tokens, and what its
/// agents may use of the server ([`tenant_violations`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Environment variable holding its API token (several, comma-separated,
    /// while rolling a new one out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tokens_env: Option<String>,
    /// File holding them (a mounted secret), the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_tokens_file: Option<String>,
    /// The server's environment variables its specs may name (`${VAR}` in
    /// a tool's headers or URL, `model.api_key_env`); none by default, so
    /// a tenant cannot send the server's secrets anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// The configured providers its agents may use (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub providers: Option<Vec<String>>,
    /// The configured MCP servers its agents may use (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp_servers: Option<Vec<String>>,
    /// Whether its HTTP tools and webhooks may reach private addresses
    /// (loopback, private ranges, link-local, unique-local); public only by
    /// default, so its agents cannot probe the server's network.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private_network: bool,
    /// Environment variable holding the secret its callbacks and approval
    /// notifications are signed with (never the server's
    /// `--webhook-secret`, which is the operator's; unsigned without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret_env: Option<String>,
}

/// What an agent of a tenant other than `default` may not do: name a
/// server secret not in its `secrets`, a provider or MCP server outside its
/// lists, or a built-in file tool (they read the server's files). Each error names the spec's field. `default` (the operator's)
/// may do anything; a tenant the configuration does not name (any more)
/// gets the defaults: no secrets, every provider and MCP server.
pub fn tenant_violations(config: &Config, tenant: &str, spec: &Spec) -> Vec<FieldError> {
    if tenant == DEFAULT_TENANT {
        return Vec::new();
    }
    let fallback = TenantConfig::default();
    let policy = config.tenants.get(tenant).unwrap_or(&fallback);
    let mut errors = Vec::new();
    let mut err = |field: String, message: String| errors.push(FieldError { field, message });
    let secret = |var: &str| policy.secrets.iter().any(|s| s == var);
    let not_a_secret = |var: &str| {
        format!(
            "tenant `{tenant}` may not use the server's variable `{var}` (tenants.{tenant}.secrets)"
        )
    };
    let models = std::iter::once(("model".to_string(), &spec.model)).chain(
        spec.model
            .fallbacks
            .iter()
            .enumerate()
            .map(|(i, m)| (format!("model.fallbacks[{i}]"), m)),
    );
    for (at, model) in models {
        if let Some(var) = &model.api_key_env
            && !secret(var)
        {
            err(format!("{at}.api_key_env"), not_a_secret(var));
        }
        let name = model.provider.name();
        if let Some(allowed) = &policy.providers
            && name != "scripted"
            && !allowed.iter().any(|p| p == name)
        {
            err(
                format!("{at}.provider"),
                format!(
                    "tenant `{tenant}` may not use provider `{name}` (tenants.{tenant}.providers)"
                ),
            );
        }
    }
    for (i, tool) in spec.tools.iter().enumerate() {
        let at = format!("tools[{i}]");
        if let Some(http) = &tool.http {
            let headers = http
                .headers
                .iter()
                .map(|(n, v)| (format!("{at}.http.headers.{n}"), v));
            for (field, text) in
                std::iter::once((format!("{at}.http.url"), &http.url)).chain(headers)
            {
                for var in env_refs(text).filter(|var| !secret(var)) {
                    err(field.clone(), not_a_secret(var));
                }
            }
        }
        if matches!(tool.builtin, Some(Builtin::ReadFile | Builtin::ListFiles)) {
            err(
                format!("{at}.builtin"),
                format!(
                    "tenant `{tenant}` may not read the server's files: use an HTTP tool, an MCP server or a worker"
                ),
            );
        }
        if let (Some(server), Some(allowed)) = (&tool.mcp, &policy.mcp_servers)
            && !allowed.contains(server)
        {
            err(
                format!("{at}.mcp"),
                format!(
                    "tenant `{tenant}` may not use MCP server `{server}` (tenants.{tenant}.mcp_servers)"
                ),
            );
        }
    }
    errors
}

impl TenantConfig {
    /// The tokens' source as an error names it: `environment variable X
    /// (tenants.<name>.api_tokens_env)` or `file P (…api_tokens_file)`.
    pub fn describe(&self, tenant: &str) -> String {
        match (&self.api_tokens_env, &self.api_tokens_file) {
            (Some(var), _) => {
                format!("environment variable {var} (tenants.{tenant}.api_tokens_env)")
            }
            (None, Some(path)) => format!("file {path} (tenants.{tenant}.api_tokens_file)"),
            (None, None) => format!("tenants.{tenant}"),
        }
    }
}

/// One MCP server: how to reach it (exactly one of `stdio` and `http`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// A local process Keel spawns, talks to over its stdin/stdout, restarts
    /// when it dies and kills on shutdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdio: Option<StdioServer>,
    /// A remote server speaking streamable HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpServer>,
    /// Timeout of one call, and of connecting (spawn + handshake + tool list).
    #[serde(default = "default_mcp_timeout", with = "human_duration")]
    pub timeout: Duration,
    /// The tool list is read again at least this often (and whenever the
    /// server announces a change).
    #[serde(default = "default_mcp_refresh", with = "human_duration")]
    pub refresh: Duration,
}

fn default_mcp_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_mcp_refresh() -> Duration {
    Duration::from_secs(300)
}

/// An MCP server run as a child process of Keel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdioServer {
    /// The program (a path, or a name looked up on Keel's `PATH`).
    pub command: String,
    /// Its arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Its whole environment: nothing of Keel's is inherited. Values may
    /// hold `${VAR}` (Keel's environment) and `${file:/path}` (a file's
    /// contents, trimmed), read at each spawn; see [`expand`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Its working directory (Keel's when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// An MCP server reached over streamable HTTP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpServer {
    /// The endpoint (`https://host/mcp`).
    pub url: String,
    /// Headers sent with every request; values may hold `${VAR}` and
    /// `${file:/path}` like a stdio server's `env`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

/// Where a `${...}` reference in an MCP server's `env` or `headers` reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ref<'a> {
    /// `${VAR}`: Keel's environment variable.
    Env(&'a str),
    /// `${file:/path}`: a file's contents, surrounding whitespace trimmed.
    File(&'a str),
}

impl Ref<'_> {
    /// How an error names it (never its value).
    pub fn describe(&self) -> String {
        match self {
            Ref::Env(var) => format!("environment variable {var}"),
            Ref::File(path) => format!("file {path}"),
        }
    }
}

/// Replaces each `${VAR}` and `${file:/path}` in `value` with what `read`
/// returns for it (`None`: unset or unreadable, an error naming the
/// reference, never a value). `$$` is not special: only `${` starts one.
pub fn expand(
    value: &str,
    mut read: impl FnMut(Ref<'_>) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err("unclosed `${` (write `${VAR}` or `${file:/path}`)".into());
        };
        let reference = parse_ref(&after[..end])?;
        match read(reference) {
            Some(v) => out.push_str(&v),
            None => {
                return Err(format!(
                    "{} is not set or cannot be read",
                    reference.describe()
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks every `${...}` of a value without reading anything.
fn check_refs(value: &str) -> Result<(), String> {
    expand(value, |_| Some(String::new())).map(drop)
}

fn parse_ref(inner: &str) -> Result<Ref<'_>, String> {
    if let Some(path) = inner.strip_prefix("file:") {
        if path.trim().is_empty() {
            return Err("`${file:}` needs a path".into());
        }
        return Ok(Ref::File(path));
    }
    if is_env_name(inner) {
        Ok(Ref::Env(inner))
    } else {
        Err(format!(
            "`${{{inner}}}` is neither an environment variable nor `file:/path`"
        ))
    }
}

/// Whether `name` may name an MCP server: 1-32 letters, digits, `_` or `-`,
/// without `__` (the model sees its tools as `<server>__<tool>`).
pub fn is_mcp_server_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.contains("__")
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The wire protocol of a provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// OpenAI-compatible chat completions (OpenAI, vLLM, Ollama, llama.cpp).
    Openai,
    /// The Anthropic Messages API.
    Anthropic,
}

impl Kind {
    /// Where requests go when `base_url` is not given.
    pub fn default_base_url(self) -> &'static str {
        match self {
            Kind::Openai => "https://api.openai.com/v1",
            Kind::Anthropic => "https://api.anthropic.com/v1",
        }
    }
}

/// One provider endpoint and what applies to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Its wire protocol.
    pub kind: Kind,
    /// Base URL (the part before `/chat/completions` or `/messages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Environment variable holding the API key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// File holding the API key (a mounted secret); surrounding whitespace
    /// is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<String>,
    /// The longest one call to this provider may take (the whole answer,
    /// streamed or not): a ceiling on the agents' `model.timeout`, which
    /// may only be shorter. None: the agent's timeout applies.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "human_duration::option"
    )]
    pub timeout: Option<Duration>,
    /// When to stop calling a failing endpoint for a while (no breaker
    /// unless given: failures are retried with the agent's backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerConfig>,
    /// Limits and prices per model name. A model not listed has no limit
    /// and no price (its cost counts as zero).
    #[serde(default)]
    pub models: BTreeMap<String, ModelConfig>,
}

impl ProviderConfig {
    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        self.base_url
            .as_deref()
            .unwrap_or_else(|| self.kind.default_base_url())
    }

    /// Where the API key comes from; `None` for a provider configured
    /// without a key (a local server). The engine reads it at each call.
    pub fn key_source(&self) -> Option<KeySource<'_>> {
        match (&self.api_key_env, &self.api_key_file) {
            (Some(var), _) => Some(KeySource::Env(var)),
            (None, Some(path)) => Some(KeySource::File(path)),
            (None, None) => None,
        }
    }
}

/// Where a provider's API key is read from (never the key itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySource<'a> {
    /// An environment variable, by name.
    Env(&'a str),
    /// A file (a mounted secret), by path; surrounding whitespace is ignored.
    File(&'a str),
}

impl KeySource<'_> {
    /// The key from the variable's or the file's contents (`None`: unset or
    /// unreadable), trimmed; the error names the source, never a key.
    pub fn key(&self, provider: &str, contents: Option<String>) -> Result<String, String> {
        match contents.as_deref().map(str::trim) {
            Some(key) if !key.is_empty() => Ok(key.to_string()),
            Some(_) => Err(format!(
                "provider `{provider}`: {} is empty",
                self.describe()
            )),
            None => Err(format!(
                "provider `{provider}`: {} is not set or cannot be read",
                self.describe()
            )),
        }
    }

    /// How an error names it.
    pub fn describe(&self) -> String {
        match self {
            KeySource::Env(var) => format!("environment variable {var} (api_key_env)"),
            KeySource::File(path) => format!("key file {path} (api_key_file)"),
        }
    }
}

/// Circuit breaker thresholds of one provider endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failed calls (transient errors: timeouts, 5xx, refused
    /// connections) that open the breaker.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// How long it stays open before letting trial calls through.
    #[serde(default = "default_open_for", with = "human_duration")]
    pub open_for: Duration,
    /// Trial calls let through while half-open; all must succeed to close it.
    #[serde(default = "default_trials")]
    pub trials: u32,
}

fn default_failures() -> u32 {
    5
}

fn default_open_for() -> Duration {
    Duration::from_secs(30)
}

fn default_trials() -> u32 {
    1
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: default_failures(),
            open_for: default_open_for(),
            trials: default_trials(),
        }
    }
}

/// Limits and prices of one model of a provider.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Requests per window (a minute unless `window` says otherwise), for
    /// every process sharing the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    /// Tokens (input + output) per window, for every process sharing the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    /// The window `rpm` and `tpm` count in (default 1m; shorter for tests
    /// and for providers that limit per second).
    #[serde(default = "default_window", with = "human_duration")]
    pub window: Duration,
    /// Time each window keeps free for the way to the provider (default
    /// 100ms): Keel spaces `rpm` requests and `tpm` tokens over `window +
    /// margin`, because the provider counts arrivals, not Keel's grants. At
    /// the exact rate, request `i + rpm` is granted exactly one window after
    /// request `i`, so the provider sees one too many whenever `i` is
    /// delayed on its way (scheduling, connection, network) more than
    /// `i + rpm`; with the margin, only when it is delayed `margin` more.
    /// It costs `margin / window` of the rate (0.17% of a minute).
    #[serde(default = "default_margin", with = "human_duration")]
    pub margin: Duration,
    /// USD per million tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<Price>,
}

fn default_window() -> Duration {
    Duration::from_secs(60)
}

fn default_margin() -> Duration {
    Duration::from_millis(100)
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            rpm: None,
            tpm: None,
            window: default_window(),
            margin: default_margin(),
            price: None,
        }
    }
}

/// A price per million tokens, in USD.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Per million input (prompt) tokens.
    pub input: f64,
    /// Per million output (completion) tokens.
    pub output: f64,
}

impl Price {
    /// The cost of one call in USD.
    pub fn cost(&self, input_tokens: u64, output_tokens: u64) -> f64 {
        (input_tokens as f64 * self.input + output_tokens as f64 * self.output) / 1_000_000.0
    }
}

/// Names an agent may not give a configured provider: they select the
/// spec's own inline settings.
pub const RESERVED_PROVIDER_NAMES: [&str; 1] = ["scripted"];

impl Config {
    /// Parses YAML or JSON text (JSON is YAML) and validates it.
    pub fn parse(text: &str) -> Result<Config, Error> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let value = crate::yaml::parse(text).map_err(Error::Syntax)?;
        Config::from_value(value)
    }

    /// Validates an already-parsed value.
    pub fn from_value(value: Value) -> Result<Config, Error> {
        let config: Config = typed(
            value,
            "the configuration must be a mapping (with `providers`)",
        )
        .map_err(Error::Invalid)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types cannot: names, URLs, one key source, limits.
    fn validate(&self) -> Result<(), Error> {
        let mut errors = Vec::new();
        let mut err = |field: String, message: String| errors.push(FieldError { field, message });
        for (name, provider) in &self.providers {
            let at = format!("providers.{name}");
            check_name(name, &at, &mut err);
            let kind_name = match provider.kind {
                Kind::Openai => "openai",
                Kind::Anthropic => "anthropic",
            };
            if ["openai", "anthropic"].contains(&name.as_str()) && name != kind_name {
                err(
                    format!("{at}.kind"),
                    format!(
                        "a provider named `{name}` must be of kind {name}: it applies to the agents whose model.provider is `{name}`"
                    ),
                );
            }
            if RESERVED_PROVIDER_NAMES.contains(&name.as_str()) {
                err(
                    at.clone(),
                    format!("`{name}` is reserved for the built-in provider"),
                );
            }
            if let Some(url) = &provider.base_url
                && !is_http_url(url)
            {
                err(
                    format!("{at}.base_url"),
                    format!("`{url}` is not an http(s) URL"),
                );
            }
            if provider.api_key_env.is_some() && provider.api_key_file.is_some() {
                err(
                    format!("{at}.api_key_env"),
                    "give api_key_env or api_key_file, not both".into(),
                );
            }
            // The value is not repeated: it may be the key, written here by mistake.
            if let Some(var) = &provider.api_key_env
                && (var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            {
                err(
                    format!("{at}.api_key_env"),
                    "must name an environment variable (letters, digits, `_`), not hold the key"
                        .into(),
                );
            }
            if let Some(path) = &provider.api_key_file
                && path.trim().is_empty()
            {
                err(format!("{at}.api_key_file"), "must not be empty".into());
            }
            if provider.timeout.is_some_and(|t| t.is_zero()) {
                err(format!("{at}.timeout"), "must be more than 0".into());
            }
            if let Some(breaker) = &provider.breaker {
                if breaker.failures == 0 {
                    err(
                        format!("{at}.breaker.failures"),
                        "must be at least 1".into(),
                    );
                }
                if breaker.trials == 0 {
                    err(format!("{at}.breaker.trials"), "must be at least 1".into());
                }
                if breaker.open_for.is_zero() {
                    err(
                        format!("{at}.breaker.open_for"),
                        "must be more than 0".into(),
                    );
                }
            }
            for (model, limits) in &provider.models {
                let at = format!("{at}.models.{model}");
                if model.trim().is_empty() {
                    err(at.clone(), "a model name must not be empty".into());
                }
                for (field, limit) in [("rpm", limits.rpm), ("tpm", limits.tpm)] {
                    if limit == Some(0) {
                        err(
                            format!("{at}.{field}"),
                            "must be at least 1 (leave it out for no limit)".into(),
                        );
                    }
                }
                if limits.window.is_zero() {
                    err(format!("{at}.window"), "must be more than 0".into());
                }
                if limits.margin >= limits.window {
                    err(
                        format!("{at}.margin"),
                        format!(
                            "must be less than the window ({:?}): it is time kept free in each window",
                            limits.window
                        ),
                    );
                }
                if let Some(price) = &limits.price {
                    for (field, value) in [("input", price.input), ("output", price.output)] {
                        if !value.is_finite() || value < 0.0 {
                            err(
                                format!("{at}.price.{field}"),
                                format!(
                                    "{value} is not a price (USD per million tokens, 0 or more)"
                                ),
                            );
                        }
                    }
                }
            }
        }
        for (name, server) in &self.mcp_servers {
            check_mcp_server(name, server, &mut err);
        }
        for (name, tenant) in &self.tenants {
            let at = format!("tenants.{name}");
            check_name(name, &at, &mut err);
            match (&tenant.api_tokens_env, &tenant.api_tokens_file) {
                (Some(_), Some(_)) => err(
                    format!("{at}.api_tokens_env"),
                    "give api_tokens_env or api_tokens_file, not both".into(),
                ),
                (None, None) => err(
                    at.clone(),
                    "give api_tokens_env or api_tokens_file: where its API tokens are read from"
                        .into(),
                ),
                (None, Some(path)) if path.trim().is_empty() => {
                    err(format!("{at}.api_tokens_file"), "must not be empty".into())
                }
                _ => {}
            }
            // Named, never held: a value written here may be the secret
            // itself, so it is not repeated.
            let variables = [
                ("api_tokens_env".to_string(), &tenant.api_tokens_env),
                ("webhook_secret_env".to_string(), &tenant.webhook_secret_env),
            ]
            .into_iter()
            .filter_map(|(field, var)| Some((field, var.as_ref()?)))
            .chain(
                tenant
                    .secrets
                    .iter()
                    .enumerate()
                    .map(|(i, var)| (format!("secrets[{i}]"), var)),
            );
            for (field, var) in variables {
                if !is_env_name(var) {
                    err(
                        format!("{at}.{field}"),
                        "must name an environment variable (letters, digits, `_`)".into(),
                    );
                }
            }
            for (i, name) in tenant.providers.iter().flatten().enumerate() {
                let built_in = !matches!(Provider::from_name(name), Provider::Named(_));
                if !built_in && !self.providers.contains_key(name) {
                    err(
                        format!("{at}.providers[{i}]"),
                        format!("`{name}` is not a configured provider"),
                    );
                }
            }
            for (i, name) in tenant.mcp_servers.iter().flatten().enumerate() {
                if !self.mcp_servers.contains_key(name) {
                    err(
                        format!("{at}.mcp_servers[{i}]"),
                        format!("`{name}` is not a configured MCP server"),
                    );
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(errors))
        }
    }

    /// An MCP server by the name agents use.
    pub fn mcp_server(&self, name: &str) -> Option<&McpServerConfig> {
        self.mcp_servers.get(name)
    }

    /// A provider by the name agents use.
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.get(name)
    }

    /// The limits and price of a provider's model, if configured.
    pub fn model(&self, provider: &str, model: &str) -> Option<&ModelConfig> {
        self.providers.get(provider)?.models.get(model)
    }
}

fn check_mcp_server(name: &str, server: &McpServerConfig, err: &mut impl FnMut(String, String)) {
    let at = format!("mcp_servers.{name}");
    if !is_mcp_server_name(name) {
        err(
            at.clone(),
            format!("`{name}` must be 1-32 letters, digits, `_` or `-`, without `__`"),
        );
    }
    match (&server.stdio, &server.http) {
        (Some(_), Some(_)) => err(at.clone(), "set either `stdio` or `http`, not both".into()),
        (None, None) => err(
            at.clone(),
            "set `stdio` (a command Keel runs) or `http` (a URL)".into(),
        ),
        (Some(stdio), None) => {
            if stdio.command.trim().is_empty() {
                err(format!("{at}.stdio.command"), "must not be empty".into());
            }
            for (var, value) in &stdio.env {
                if !is_env_name(var) {
                    err(
                        format!("{at}.stdio.env.{var}"),
                        format!("`{var}` is not an environment variable name"),
                    );
                }
                if let Err(message) = check_refs(value) {
                    err(format!("{at}.stdio.env.{var}"), message);
                }
            }
            if stdio.cwd.as_deref().is_some_and(|c| c.trim().is_empty()) {
                err(format!("{at}.stdio.cwd"), "must not be empty".into());
            }
        }
        (None, Some(http)) => {
            if !is_http_url(&http.url) {
                err(
                    format!("{at}.http.url"),
                    format!("`{}` is not an http(s) URL", http.url),
                );
            }
            for (header, value) in &http.headers {
                let valid = !header.is_empty()
                    && header
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                if !valid {
                    err(
                        format!("{at}.http.headers.{header}"),
                        format!("`{header}` is not a header name"),
                    );
                }
                if let Err(message) = check_refs(value) {
                    err(format!("{at}.http.headers.{header}"), message);
                }
            }
        }
    }
    if server.timeout.is_zero() {
        err(format!("{at}.timeout"), "must be more than 0".into());
    }
    if server.refresh.is_zero() {
        err(format!("{at}.refresh"), "must be more than 0".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
providers:
  openai:
    kind: openai
    api_key_env: OPENAI_API_KEY
    breaker: {failures: 3, open_for: 10s}
    models:
      gpt-4o:
        rpm: 600
        tpm: 150000
        price: {input: 2.5, output: 10}
  claude:
    kind: anthropic
    api_key_file: /run/secrets/anthropic
    timeout: 2m
    models:
      claude-sonnet: {rpm: 50}
  local:
    kind: openai
    base_url: http://127.0.0.1:8000/v1
"#;

    #[test]
    fn a_full_configuration_parses_with_defaults() {
        let config = Config::parse(FULL).expect("valid");
        let openai = config.provider("openai").expect("openai");
        assert_eq!(openai.kind, Kind::Openai);
        assert_eq!(openai.base_url(), "https://api.openai.com/v1");
        assert_eq!(openai.timeout, None);
        let breaker = openai.breaker.clone().expect("a breaker");
        assert_eq!(breaker.failures, 3);
        assert_eq!(breaker.open_for, Duration::from_secs(10));
        assert_eq!(breaker.trials, 1);
        let gpt = config.model("openai", "gpt-4o").expect("model");
        assert_eq!((gpt.rpm, gpt.tpm), (Some(600), Some(150_000)));
        let price = gpt.price.expect("price");
        assert!((price.cost(1_000_000, 100_000) - 3.5).abs() < 1e-9);
        let claude = config.provider("claude").expect("claude");
        assert_eq!(claude.base_url(), "https://api.anthropic.com/v1");
        assert_eq!(claude.timeout, Some(Duration::from_secs(120)));
        assert_eq!(claude.breaker, None);
        assert_eq!(gpt.window, Duration::from_secs(60));
        assert_eq!(gpt.margin, Duration::from_millis(100));
        assert_eq!(
            config.provider("local").map(ProviderConfig::base_url),
            Some("http://127.0.0.1:8000/v1")
        );
        assert!(config.model("openai", "gpt-3.5").is_none());
        assert!(config.provider("nope").is_none());
    }

    #[test]
    fn an_empty_file_configures_nothing() {
        assert_eq!(Config::parse("").expect("empty"), Config::default());
        assert_eq!(
            Config::parse("providers: {}").expect("none"),
            Config::default()
        );
    }

    fn fields(text: &str) -> Vec<String> {
        match Config::parse(text) {
            Err(Error::Invalid(errors)) => errors.into_iter().map(|e| e.field).collect(),
            other => panic!("expected field errors, got {other:?}"),
        }
    }

    #[test]
    fn tenants_name_where_their_tokens_are() {
        let config = Config::parse(
            "tenants:\n  acme: {api_tokens_env: ACME_TOKENS}\n  globex: {api_tokens_file: /run/t}\n",
        )
        .expect("valid");
        let acme = &config.tenants["acme"];
        assert_eq!(acme.api_tokens_env.as_deref(), Some("ACME_TOKENS"));
        assert_eq!(
            acme.describe("acme"),
            "environment variable ACME_TOKENS (tenants.acme.api_tokens_env)"
        );
        assert_eq!(
            config.tenants["globex"].describe("globex"),
            "file /run/t (tenants.globex.api_tokens_file)"
        );
        assert_eq!(fields("tenants: {acme: {}}"), ["tenants.acme"]);
        assert_eq!(
            fields("tenants: {acme: {api_tokens_env: A, api_tokens_file: /f}}"),
            ["tenants.acme.api_tokens_env"]
        );
        // A token written where the variable's name goes is not repeated.
        let Err(e) = Config::parse("tenants: {acme: {api_tokens_env: 'tok-123 456'}}") else {
            panic!("refused");
        };
        assert!(!e.to_string().contains("tok-123"), "{e}");
        assert_eq!(
            fields("tenants: {'a/b': {api_tokens_env: A}, c: {api_tokens_file: ' '}}"),
            ["tenants.a/b", "tenants.c.api_tokens_file"]
        );
        assert_eq!(
            fields("tenants: {acme: {token: x}}"),
            ["tenants.acme.token"]
        );
    }

    #[test]
    fn a_tenant_runs_only_what_its_policy_allows() {
        let config = Config::parse(
            "providers:\n  eu: {kind: openai}\n  us: {kind: openai}\n\
             mcp_servers:\n  github: {http: {url: 'http://gh/mcp'}}\n  search: {http: {url: 'http://s/mcp'}}\n\
             tenants:\n  acme: {api_tokens_env: T, secrets: [ACME_KEY], providers: [eu, scripted], mcp_servers: [github]}\n",
        )
        .expect("valid");
        let spec = |text: &str| {
            crate::Agent::parse(&format!("name: a\nversion: 1\n{text}"))
                .expect("a valid spec")
                .spec
        };
        let fields = |tenant: &str, text: &str| -> Vec<String> {
            tenant_violations(&config, tenant, &spec(text))
                .into_iter()
                .map(|e| e.field)
                .collect()
        };
        let tool = |http: &str| {
            format!(
                "model: {{provider: eu, model: m}}\ntools:\n  - {{name: t, description: d, parameters: {{type: object}}, http: {http}}}\n"
            )
        };
        // Within the policy.
        let fine = tool(
            "{url: 'http://x/?key=${ACME_KEY}', headers: {Authorization: 'Bearer ${ACME_KEY}'}}",
        );
        assert_eq!(fields("acme", &fine), Vec::<String>::new());
        // The server's other secrets, providers and file tools.
        let secret = tool(
            "{url: 'http://x/?key=${KEEL_WEBHOOK_SECRET}', headers: {X-Key: '${DB_PASSWORD}'}}",
        );
        assert_eq!(
            fields("acme", &secret),
            ["tools[0].http.url", "tools[0].http.headers.X-Key"]
        );
        assert_eq!(
            fields(
                "acme",
                "model: {provider: openai, model: m, api_key_env: OPENAI_API_KEY, fallbacks: [{provider: us, model: m}, {provider: eu, model: m, api_key_env: ACME_KEY}]}\n"
            ),
            [
                "model.api_key_env",
                "model.provider",
                "model.fallbacks[0].provider"
            ]
        );
        let files = "model: {provider: scripted, model: m, script: [{content: hi}]}\ntools:\n  - {name: r, builtin: read_file, root: /etc}\n  - {mcp: search, allow: ['*']}\n  - {mcp: github, allow: ['*']}\n";
        assert_eq!(fields("acme", files), ["tools[0].builtin", "tools[1].mcp"]);
        // The operator's tenant may do anything; an unknown tenant gets the
        // defaults (no secrets, every provider).
        assert_eq!(fields("default", &secret), Vec::<String>::new());
        assert_eq!(
            fields("gone", &fine),
            ["tools[0].http.url", "tools[0].http.headers.Authorization"]
        );
        let message = tenant_violations(&config, "acme", &spec(&secret))[0]
            .message
            .clone();
        assert!(
            message.contains("KEEL_WEBHOOK_SECRET") && message.contains("tenants.acme.secrets"),
            "{message}"
        );
        // The lists name what the configuration has.
        assert_eq!(
            super::tests::fields(
                "tenants: {a: {api_tokens_env: T, secrets: ['1X'], providers: [nope], mcp_servers: [none]}}"
            ),
            [
                "tenants.a.secrets[0]",
                "tenants.a.providers[0]",
                "tenants.a.mcp_servers[0]"
            ]
        );
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            fields("providers: {openai: {kind: openai, api_key: sk-123}}"),
            ["providers.openai.api_key"]
        );
        assert_eq!(
            fields("providers: {openai: {kind: gemini}}"),
            ["providers.openai.kind"]
        );
        assert_eq!(
            fields("providers: {openai: {kind: openai, timeout: soon}}"),
            ["providers.openai.timeout"]
        );
        assert_eq!(
            fields(
                "providers: {openai: {kind: openai, models: {gpt: {rpm: 0, price: {input: -1, output: 1}}}}}"
            ),
            [
                "providers.openai.models.gpt.rpm",
                "providers.openai.models.gpt.price.input"
            ]
        );
        assert_eq!(
            fields("providers: {o: {kind: openai, models: {m: {rpm: 5, window: 1s, margin: 1s}}}}"),
            ["providers.o.models.m.margin"]
        );
        assert_eq!(
            fields("providers: {o: {kind: openai, api_key_env: X, api_key_file: /k}}"),
            ["providers.o.api_key_env"]
        );
        assert_eq!(
            fields("providers: {o: {kind: openai, api_key_env: sk-live-123}}"),
            ["providers.o.api_key_env"]
        );
        let Err(e) = Config::parse("providers: {o: {kind: openai, api_key_env: sk-live-123}}")
        else {
            panic!("a key in api_key_env is refused");
        };
        assert!(!e.to_string().contains("sk-live-123"), "{e}");
        assert_eq!(
            fields("providers: {o: {kind: openai, base_url: ftp://x}}"),
            ["providers.o.base_url"]
        );
        assert_eq!(
            fields(
                "providers: {o: {kind: openai, breaker: {failures: 0, trials: 0, open_for: 0s}}}"
            ),
            [
                "providers.o.breaker.failures",
                "providers.o.breaker.trials",
                "providers.o.breaker.open_for"
            ]
        );
        assert_eq!(
            fields("providers: {scripted: {kind: openai}}"),
            ["providers.scripted"]
        );
        assert_eq!(
            fields("providers: {openai: {kind: anthropic}}"),
            ["providers.openai.kind"]
        );
        assert_eq!(
            fields("providers: {'bad name': {kind: openai}}"),
            ["providers.bad name"]
        );
        assert_eq!(fields("- a list"), ["(root)"]);
        assert!(matches!(
            Config::parse("providers: ["),
            Err(Error::Syntax(_))
        ));
    }

    #[test]
    fn mcp_servers_parse_and_errors_name_the_field() {
        let config = Config::parse(
            r#"
mcp_servers:
  github:
    stdio:
      command: github-mcp-server
      args: [stdio]
      env: {GITHUB_TOKEN: "${GH}", PATH: "${PATH}", KEY: "${file:/run/k}"}
  search:
    http:
      url: https://mcp.example.com/mcp
      headers: {Authorization: "Bearer ${SEARCH_TOKEN}"}
    timeout: 5s
    refresh: 1m
"#,
        )
        .expect("valid");
        let github = config.mcp_server("github").expect("github");
        let stdio = github.stdio.as_ref().expect("stdio");
        assert_eq!(stdio.args, ["stdio"]);
        assert_eq!(github.timeout, Duration::from_secs(30));
        assert_eq!(github.refresh, Duration::from_secs(300));
        let search = config.mcp_server("search").expect("search");
        assert_eq!(search.timeout, Duration::from_secs(5));
        assert!(search.http.is_some());

        assert_eq!(
            fields("mcp_servers: {a: {stdio: {command: x}, http: {url: 'http://h'}}}"),
            ["mcp_servers.a"]
        );
        assert_eq!(fields("mcp_servers: {a: {timeout: 1s}}"), ["mcp_servers.a"]);
        assert_eq!(
            fields("mcp_servers: {a__b: {stdio: {command: x}}}"),
            ["mcp_servers.a__b"]
        );
        assert_eq!(
            fields(
                "mcp_servers: {a: {stdio: {command: ' ', env: {'1X': y, T: '${sk-1}', U: '${file:}', V: '${W'}}}}"
            ),
            [
                "mcp_servers.a.stdio.command",
                "mcp_servers.a.stdio.env.1X",
                "mcp_servers.a.stdio.env.T",
                "mcp_servers.a.stdio.env.U",
                "mcp_servers.a.stdio.env.V"
            ]
        );
        assert_eq!(
            fields(
                "mcp_servers: {a: {http: {url: 'ftp://x', headers: {'Bad Name': v}}, timeout: 0s, refresh: 0s}}"
            ),
            [
                "mcp_servers.a.http.url",
                "mcp_servers.a.http.headers.Bad Name",
                "mcp_servers.a.timeout",
                "mcp_servers.a.refresh"
            ]
        );
        assert_eq!(
            fields("mcp_servers: {a: {stdio: {command: x, secret: y}}}"),
            ["mcp_servers.a.stdio.secret"]
        );
    }

    #[test]
    fn references_expand_from_the_environment_and_files() {
        let read = |r: Ref<'_>| match r {
            Ref::Env("TOKEN") => Some("t0k".to_string()),
            Ref::File("/run/k") => Some("f1le".to_string()),
            _ => None,
        };
        assert_eq!(
            expand("Bearer ${TOKEN}/${file:/run/k}!", read),
            Ok("Bearer t0k/f1le!".to_string())
        );
        assert_eq!(expand("plain $x {y}", read), Ok("plain $x {y}".to_string()));
        let missing = expand("${NOPE}", read).expect_err("unset");
        assert_eq!(
            missing,
            "environment variable NOPE is not set or cannot be read"
        );
        let missing = expand("${file:/none}", read).expect_err("unreadable");
        assert!(missing.contains("file /none"), "{missing}");
        assert!(expand("${TOKEN", read).is_err());
    }

    #[test]
    fn keys_come_from_the_environment_or_a_file_and_errors_name_the_source() {
        let config = Config::parse(FULL).expect("valid");
        let openai = config.provider("openai").expect("openai");
        let source = openai.key_source().expect("a key");
        assert_eq!(source, KeySource::Env("OPENAI_API_KEY"));
        assert_eq!(
            source.key("openai", Some("sk-test\n".into())),
            Ok("sk-test".to_string())
        );
        let missing = source.key("openai", None).expect_err("unset");
        assert!(missing.contains("OPENAI_API_KEY"), "{missing}");
        let claude = config.provider("claude").expect("claude");
        let file = claude.key_source().expect("a key");
        assert_eq!(file, KeySource::File("/run/secrets/anthropic"));
        let empty = file.key("claude", Some(" \n".into())).expect_err("empty");
        assert!(
            empty.contains("/run/secrets/anthropic") && empty.contains("empty"),
            "{empty}"
        );
        assert_eq!(config.provider("local").expect("local").key_source(), None);
    }
}
