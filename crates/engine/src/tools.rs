//! Tool execution: one call in, one [`Outcome`] out.
//!
//! [`Tools::invoke`] never fails: a tool that cannot be reached, answers with
//! an error, or is asked for something it refuses, yields an error outcome the
//! model reads and can react to. Two kinds of tools:
//!
//! * HTTP tools: arguments become the query string (GET, DELETE) or a JSON
//!   body (POST, PUT, PATCH), `{name}` placeholders in the URL are filled from
//!   them, `${ENV}` in the URL and in header values is read from the server's
//!   environment.
//!   Every attempt carries the call's `Idempotency-Key` (the same on every
//!   retry, and when a call is repeated after a crash) and a `traceparent` in
//!   the run's trace. Network errors, timeouts, 429 and 5xx are retried per the
//!   tool's `retry` policy. What the model reads never shows the secrets the
//!   call carried (the `${ENV}` values, the URL's user info, the values of
//!   query parameters named like `api_key` or `token`), and a redirect to
//!   another origin is followed without the headers holding them.
//! * Built-ins: `read_file` and `list_files`, confined to the tool's `root`.
//! * MCP tools (`<server>__<tool>` of an agent resolved by
//!   [`Mcp::resolve`](crate::mcp::Mcp::resolve)): a `tools/call` to the server,
//!   see [`crate::mcp`].

use std::cell::RefCell;
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_core::RunId;
use keel_core::run::Invocation;
use keel_core::spec::{
    Agent, Builtin, HttpTool, Method, clip, expand_secrets, may_name_secret, redact_url,
};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use crate::mcp::Mcp;
use crate::metrics;
use crate::net::{Clients, Egress};

/// Tool outputs (and file contents) are clipped to this many bytes.
pub const MAX_OUTPUT_BYTES: usize = 32 * 1024;

/// `list_files` lists at most this many files.
pub const MAX_LISTED_FILES: usize = 1000;

/// How many bytes of an error body go into an error outcome.
const ERROR_BODY_BYTES: usize = 300;

/// Secrets shorter than this are not searched for in outputs (they would
/// mangle ordinary text and protect nothing).
const MIN_REDACTED_LEN: usize = 4;

const USER_AGENT: &str = concat!("keel/", env!("CARGO_PKG_VERSION"));

/// Reads an environment variable; replaceable for tests and embedding.
type Lookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Makes tool calls. Cheap to clone.
#[derive(Clone)]
pub struct Tools {
    clients: Clients,
    env: Lookup,
    mcp: Mcp,
}

impl fmt::Debug for Tools {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tools").finish_non_exhaustive()
    }
}

/// What a tool call produced: the text the model sees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The result, or what went wrong, clipped to [`MAX_OUTPUT_BYTES`].
    pub output: String,
    /// Whether `output` describes a failure.
    pub is_error: bool,
    /// Whether the call was cut off with no answer after it was sent (the
    /// connection to its MCP server died mid-call): it may or may not have
    /// happened, and `output` says why. It is no result: the tools step
    /// journals nothing for it and fails the task's attempt, as if the
    /// worker had died, so the tool's `on_uncertain` decides what happens
    /// next. A caller that cannot wait for that reads it as an error
    /// (`is_error` is set too).
    pub uncertain: bool,
}

impl Outcome {
    /// A result.
    pub fn ok(output: impl Into<String>) -> Outcome {
        Outcome {
            output: output.into(),
            is_error: false,
            uncertain: false,
        }
    }

    /// A failure, described for the model.
    pub fn error(output: impl Into<String>) -> Outcome {
        Outcome {
            output: output.into(),
            is_error: true,
            uncertain: false,
        }
    }

    /// A call cut off after it was sent: `why` says how.
    pub fn uncertain(why: impl Into<String>) -> Outcome {
        Outcome {
            output: why.into(),
            is_error: true,
            uncertain: true,
        }
    }
}

/// The span of one tool call, ended now.
fn tool_span(
    agent: &Agent,
    run_id: RunId,
    call: &Invocation,
    kind: metrics::ToolKind,
    outcome: &Outcome,
    span_id: u64,
    started_ns: u64,
) -> crate::trace::Span {
    use crate::trace::{Kind, Span};
    let mut span = Span::child(
        run_id,
        span_id,
        format!("tool {}", call.tool),
        Kind::Client,
        started_ns,
    );
    span.end_ns = crate::trace::now_ns();
    if outcome.is_error {
        span.error = Some(clip(&outcome.output, 256));
    }
    span.set("keel.run_id", run_id.to_string());
    span.set("keel.agent", agent.spec.name.as_str());
    span.set("keel.step", call.step);
    span.set("keel.call_index", call.call_index);
    span.set("keel.attempt", call.attempt);
    span.set("keel.tool.kind", kind.as_str());
    span.set("keel.idempotency_key", call.idempotency_key.as_str());
    span.set("keel.uncertain", outcome.uncertain);
    span
}

impl Tools {
    /// Tools reading `${ENV}` header secrets from the process environment at
    /// call time, calling through `http`, or `public` (a client resolving
    /// names to public addresses only) for a run whose egress is public.
    pub fn new(clients: Clients) -> Tools {
        Tools {
            clients,
            env: Arc::new(|name| std::env::var(name).ok()),
            mcp: Mcp::default(),
        }
    }

    /// Calls MCP tools through `mcp`.
    pub fn with_mcp(mut self, mcp: Mcp) -> Tools {
        self.mcp = mcp;
        self
    }

    /// Replaces the process environment as the source of header secrets.
    pub fn with_env(
        mut self,
        lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Tools {
        self.env = Arc::new(lookup);
        self
    }

    /// Makes one tool call. Never fails: every error becomes an error outcome
    /// the model sees, except a call cut off mid-way, whose outcome is
    /// [`Outcome::uncertain`]. Counted in the metrics
    /// (`keel_tool_calls_total`, `keel_tool_call_duration_seconds`).
    pub async fn invoke(
        &self,
        agent: &Agent,
        egress: Egress,
        run_id: RunId,
        call: &Invocation,
    ) -> Outcome {
        let kind = if agent.mcp_tool(&call.tool).is_some() {
            metrics::ToolKind::Mcp
        } else {
            match agent.tool(&call.tool) {
                Some(tool) if tool.http.is_some() => metrics::ToolKind::Http,
                Some(tool) if tool.builtin.is_some() => metrics::ToolKind::Builtin,
                _ => metrics::ToolKind::Unknown,
            }
        };
        let started = std::time::Instant::now();
        let started_ns = crate::trace::now_ns();
        // The call's span: the parent of whatever the tool server does.
        let span_id = crate::trace::span_id();
        let outcome = self.make(agent, egress, run_id, call, span_id).await;
        metrics::tool_call(kind, &outcome, started.elapsed());
        if crate::trace::enabled() {
            crate::trace::record(tool_span(
                agent, run_id, call, kind, &outcome, span_id, started_ns,
            ));
        }
        outcome
    }

    async fn make(
        &self,
        agent: &Agent,
        egress: Egress,
        run_id: RunId,
        call: &Invocation,
        span_id: u64,
    ) -> Outcome {
        if let Some(tool) = agent.mcp_tool(&call.tool) {
            return self.mcp.call(agent, tool, run_id, call, span_id).await;
        }
        let Some(tool) = agent.tool(&call.tool) else {
            return Outcome::error(format!(
                "unknown tool `{}`; available tools: {}",
                call.tool,
                agent.tool_names().join(", ")
            ));
        };
        if let Some(http) = &tool.http {
            return self
                .call_http(&tool.name, http, egress, run_id, call, span_id)
                .await;
        }
        let root = tool.root.as_deref().unwrap_or_default();
        match tool.builtin {
            Some(Builtin::ReadFile) => read_file(root, &call.arguments).await,
            Some(Builtin::ListFiles) => list_files(root).await,
            // Made by the worker: it starts child runs (run::Command::Spawn).
            Some(Builtin::SpawnAgents) => Outcome::error(format!(
                "`{}` starts child runs: it is not an ordinary tool call",
                tool.name
            )),
            None => Outcome::error(format!("tool `{}` has no implementation", tool.name)),
        }
    }

    async fn call_http(
        &self,
        name: &str,
        http: &HttpTool,
        egress: Egress,
        run_id: RunId,
        call: &Invocation,
        span_id: u64,
    ) -> Outcome {
        let request = match self.prepare(http, call) {
            Ok(request) => request,
            Err(message) => {
                return Outcome::error(format!("tool `{name}` was not called: {message}"));
            }
        };
        let redact = |text: &str| redact(text, &request.secrets);

        let max_attempts = http.retry.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let failure = match self.attempt(http, &request, egress, run_id, span_id).await {
                Ok(body) => return Outcome::ok(clip(&redact(&body), MAX_OUTPUT_BYTES)),
                Err(failure) => failure,
            };
            let message = redact(&failure.message);
            if !failure.retryable || attempt >= max_attempts {
                let tries = if attempt == 1 {
                    String::new()
                } else {
                    format!(" after {attempt} attempts")
                };
                return Outcome::error(format!("tool `{name}` failed{tries}: {message}"));
            }
            let backoff = &http.retry.backoff;
            let delay = match failure.retry_after {
                Some(wait) => wait.min(backoff.max),
                None => backoff.delay(attempt, fastrand::f64()),
            };
            tracing::warn!(
                run_id = %run_id,
                tool = name,
                attempt,
                delay_ms = delay.as_millis() as u64,
                error = %message,
                "tool call failed, retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Builds what every attempt sends: URL, headers, body.
    fn prepare(&self, http: &HttpTool, call: &Invocation) -> Result<Prepared, String> {
        let mut arguments = match &call.arguments {
            Value::Object(map) => map.clone(),
            Value::Null => Map::new(),
            other => return Err(format!("arguments must be a JSON object, got {other}")),
        };
        // Every `${VAR}` value read, in the URL or a header, is scrubbed from
        // what the model sees; as sent (percent-encoded) too.
        let secrets = RefCell::new(Vec::new());
        let read = |var: &str| {
            let value = (self.env)(var)?;
            if value.len() >= MIN_REDACTED_LEN {
                let mut secrets = secrets.borrow_mut();
                secrets.push(encode_component(&value));
                secrets.push(value.clone());
            }
            Some(value)
        };
        let filled = fill_placeholders(&http.url, &mut arguments, |var| {
            read(var)
                .ok_or_else(|| format!("environment variable `{var}` is not set on the server"))
        })
        .map_err(|e| format!("URL: {e}"))?;
        let mut url = reqwest::Url::parse(&filled)
            .map_err(|e| format!("`{}` is not a valid URL: {e}", redact_url(&filled)))?;
        secrets.borrow_mut().extend(url_secrets(&url));

        let (method, body) = match http.method {
            Method::Get => (reqwest::Method::GET, None),
            Method::Delete => (reqwest::Method::DELETE, None),
            Method::Post => (reqwest::Method::POST, Some(arguments.clone())),
            Method::Put => (reqwest::Method::PUT, Some(arguments.clone())),
            Method::Patch => (reqwest::Method::PATCH, Some(arguments.clone())),
        };
        if body.is_none() && !arguments.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in &arguments {
                pairs.append_pair(key, &plain(value));
            }
        }

        let mut headers = HeaderMap::new();
        for (name, template) in &http.headers {
            let value =
                expand_secrets(template, read).map_err(|e| format!("header `{name}`: {e}"))?;
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not a valid header name"))?;
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| format!("the value of header `{name}` is not a valid header value"))?;
            if template.contains("${") {
                value.set_sensitive(true);
            }
            headers.insert(name, value);
        }
        if !headers.contains_key(header::USER_AGENT) {
            headers.insert(header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        }
        let key = HeaderValue::from_str(&call.idempotency_key)
            .map_err(|_| "the idempotency key is not a valid header value".to_string())?;
        headers.insert("idempotency-key", key);

        Ok(Prepared {
            method,
            url,
            headers,
            body,
            secrets: secrets.into_inner(),
        })
    }

    /// One attempt. `Ok` holds the body of a 2xx answer.
    ///
    /// The client follows redirects within an origin ([`redirect_policy`]);
    /// one to another origin is followed here, without the headers that
    /// carry secrets.
    async fn attempt(
        &self,
        http: &HttpTool,
        request: &Prepared,
        egress: Egress,
        run_id: RunId,
        span_id: u64,
    ) -> Result<String, Failure> {
        let mut method = request.method.clone();
        let mut url = request.url.clone();
        let mut headers = request.headers.clone();
        let mut body = request.body.as_ref();
        let mut hops = 0;
        let mut response = loop {
            // Each hop: a redirect may name another address.
            let client = self.clients.to(egress, &url).map_err(|message| Failure {
                message,
                retryable: false,
                retry_after: None,
            })?;
            let mut builder = client
                .request(method.clone(), url.clone())
                .headers(headers.clone())
                .header("traceparent", crate::trace::traceparent(run_id, span_id))
                .timeout(http.timeout);
            if let Some(body) = body {
                builder = builder.json(body);
            }
            let response = builder
                .send()
                .await
                .map_err(|e| Failure::network(e, http.timeout))?;
            let Some(next) = elsewhere(&response) else {
                break response;
            };
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(Failure {
                    message: format!("more than {MAX_REDIRECTS} redirects"),
                    retryable: false,
                    retry_after: None,
                });
            }
            headers = without_secrets(&headers);
            // As browsers do: 303, and 301/302 after a POST, go on with a GET.
            let status = response.status();
            if status == StatusCode::SEE_OTHER
                || (matches!(status, StatusCode::MOVED_PERMANENTLY | StatusCode::FOUND)
                    && method == reqwest::Method::POST)
            {
                method = reqwest::Method::GET;
                body = None;
            }
            url = next;
        };
        let status = response.status();
        let retry_after = match status {
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                crate::llm::retry_after(response.headers())
            }
            _ => None,
        };
        let limit = if status.is_success() {
            MAX_OUTPUT_BYTES
        } else {
            ERROR_BODY_BYTES
        };
        // Read a little past the limit so `clip` can mark the cut, and past
        // the end of any secret starting before it, so it is redacted whole.
        let longest = request.secrets.iter().map(String::len).max().unwrap_or(0);
        let mut bytes = Vec::new();
        while bytes.len() <= limit + longest {
            match response.chunk().await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                Ok(None) => break,
                Err(e) => return Err(Failure::network(e, http.timeout)),
            }
        }
        let text = redact(&String::from_utf8_lossy(&bytes), &request.secrets);
        if status.is_success() {
            return Ok(text);
        }
        Err(Failure {
            message: format!("HTTP {status}: {}", clip(text.trim(), ERROR_BODY_BYTES)),
            retryable: status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT,
            retry_after,
        })
    }
}

/// A request ready to send, the same on every attempt.
struct Prepared {
    method: reqwest::Method,
    url: reqwest::Url,
    headers: HeaderMap,
    body: Option<Map<String, Value>>,
    /// Secret values expanded into the headers or written in the URL,
    /// scrubbed from every output.
    secrets: Vec<String>,
}

/// `text` with every secret replaced by `[redacted]`.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for secret in secrets {
        text = text.replace(secret.as_str(), "[redacted]");
    }
    text
}

/// Most redirects to another origin one attempt follows.
const MAX_REDIRECTS: usize = 10;

/// The redirect policy of the client making HTTP tool calls and LLM calls:
/// follow redirects within an origin (scheme, host and port), at most 10;
/// stop at one to another origin and hand its answer back. Headers may
/// carry secrets (`${VAR}` values, an Anthropic `x-api-key`) that the
/// client would pass on; tools follow such redirects without them, a model
/// call fails.
pub fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let same = attempt
            .previous()
            .last()
            .is_some_and(|previous| same_origin(previous, attempt.url()));
        if !same {
            attempt.stop()
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else {
            attempt.follow()
        }
    })
}

fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Where a redirect the client stopped at leads (to another origin).
fn elsewhere(response: &reqwest::Response) -> Option<reqwest::Url> {
    if !response.status().is_redirection() {
        return None;
    }
    let location = response.headers().get(header::LOCATION)?.to_str().ok()?;
    let next = response.url().join(location).ok()?;
    (!same_origin(response.url(), &next)).then_some(next)
}

/// `headers` without those that carry secrets: the values expanded from
/// `${VAR}` (marked sensitive) and the credentials headers.
fn without_secrets(headers: &HeaderMap) -> HeaderMap {
    let credentials = [
        header::AUTHORIZATION,
        header::COOKIE,
        header::PROXY_AUTHORIZATION,
    ];
    let mut kept = HeaderMap::new();
    for (name, value) in headers {
        if !value.is_sensitive() && !credentials.contains(name) {
            kept.append(name, value.clone());
        }
    }
    kept
}

/// What a tool's URL carries that a tool's answer must not show: its user
/// info (a password, or a user name alone: a token) and the values of the
/// query parameters named like secrets (`api_key`, `access_token`, `sig`, …).
fn url_secrets(url: &reqwest::Url) -> Vec<String> {
    let mut secrets = vec![url.password().unwrap_or(url.username()).to_string()];
    for (name, value) in url.query_pairs() {
        if may_name_secret(&name) {
            // As sent (percent-encoded) too: an answer may quote the request line.
            secrets.push(encode_component(&value));
            secrets.push(value.into_owned());
        }
    }
    secrets.retain(|s| s.len() >= MIN_REDACTED_LEN);
    secrets.sort();
    secrets.dedup();
    secrets
}

/// Why one attempt failed.
struct Failure {
    message: String,
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn network(error: reqwest::Error, timeout: Duration) -> Failure {
        if error.is_timeout() {
            return Failure {
                message: format!(
                    "timed out after {}",
                    keel_core::spec::human_duration::format(timeout)
                ),
                retryable: true,
                retry_after: None,
            };
        }
        let retryable = !error.is_builder();
        let error = error.without_url();
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Failure {
            message,
            retryable,
            retry_after: None,
        }
    }
}

/// A JSON value as a query or path parameter: strings as they are, the rest as JSON.
fn plain(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Replaces each `{name}` in `url` with the URL-encoded argument `name`,
/// removing it from `arguments`, and each `${VAR}` with the URL-encoded
/// value `secret(VAR)` gives (the server's environment). Braces around
/// anything but a name stay. One pass: an argument's value is never read
/// as a reference, nor a secret's as a placeholder.
fn fill_placeholders(
    url: &str,
    arguments: &mut Map<String, Value>,
    mut secret: impl FnMut(&str) -> Result<String, String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(url.len());
    let mut used = Vec::new();
    let mut rest = url;
    while let Some(start) = rest.find('{') {
        let reference = rest[..start].ends_with('$');
        out.push_str(&rest[..start - usize::from(reference)]);
        let after = &rest[start + 1..];
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(after.len());
        if name_len == 0 || !after[name_len..].starts_with('}') {
            if reference {
                out.push('$');
            }
            out.push('{');
            rest = after;
            continue;
        }
        let name = &after[..name_len];
        if reference {
            out.push_str(&encode_component(&secret(name)?));
        } else {
            let Some(value) = arguments.get(name) else {
                return Err(format!("the URL needs argument `{name}`, which is missing"));
            };
            out.push_str(&encode_component(&plain(value)));
            used.push(name.to_string());
        }
        rest = &after[name_len + 1..];
    }
    out.push_str(rest);
    for name in used {
        arguments.remove(&name);
    }
    Ok(out)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode_component(text: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0xf)] as char);
        }
    }
    out
}

async fn read_file(root: &str, arguments: &Value) -> Outcome {
    let Some(path) = arguments.get("path").and_then(Value::as_str) else {
        return Outcome::error("read_file needs a `path` string argument");
    };
    let root = PathBuf::from(root);
    let path = path.to_string();
    match tokio::task::spawn_blocking(move || read_under(&root, &path)).await {
        Ok(Ok(text)) => Outcome::ok(text),
        Ok(Err(message)) => Outcome::error(message),
        Err(e) => Outcome::error(format!("read_file failed: {e}")),
    }
}

/// Reads `relative` under `root`, refusing anything that leaves it.
fn read_under(root: &Path, relative: &str) -> Result<String, String> {
    let path = Path::new(relative);
    if relative.is_empty() || path.has_root() || path.is_absolute() {
        return Err(format!(
            "`{relative}` is not a relative path inside the tool's folder"
        ));
    }
    // Refuse `..` that climbs out before touching the file system, so nothing
    // outside the folder can even be probed for existence.
    let mut depth = 0usize;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| format!("`{relative}` is outside the tool's folder"))?;
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "`{relative}` is not a relative path inside the tool's folder"
                ));
            }
        }
    }
    let root = root
        .canonicalize()
        .map_err(|e| format!("the tool's folder cannot be opened ({})", e.kind()))?;
    // Symlinks are resolved here; the target must still be under the folder.
    let full = root.join(path).canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("no file `{relative}`"),
        kind => format!("cannot open `{relative}` ({kind})"),
    })?;
    if !full.starts_with(&root) {
        return Err(format!("`{relative}` is outside the tool's folder"));
    }
    if !full.is_file() {
        return Err(format!("`{relative}` is not a file"));
    }
    let file = std::fs::File::open(&full)
        .map_err(|e| format!("cannot open `{relative}` ({})", e.kind()))?;
    let mut bytes = Vec::new();
    file.take(MAX_OUTPUT_BYTES as u64 + 4)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read `{relative}` ({})", e.kind()))?;
    let truncated = bytes.len() > MAX_OUTPUT_BYTES;
    let text = match std::str::from_utf8(&bytes) {
        Ok(text) => text,
        // A character cut in half by the read limit is not an encoding error.
        Err(e) if truncated && e.error_len().is_none() => {
            std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default()
        }
        Err(_) => return Err(format!("`{relative}` is not a UTF-8 text file")),
    };
    Ok(clip(text, MAX_OUTPUT_BYTES))
}

async fn list_files(root: &str) -> Outcome {
    let root = PathBuf::from(root);
    match tokio::task::spawn_blocking(move || list_under(&root)).await {
        Ok(Ok(listing)) => Outcome::ok(clip(&listing, MAX_OUTPUT_BYTES)),
        Ok(Err(message)) => Outcome::error(message),
        Err(e) => Outcome::error(format!("list_files failed: {e}")),
    }
}

/// The regular files under `root` (symlinks are not followed), relative,
/// `/`-separated, sorted, one a line, at most [`MAX_LISTED_FILES`].
fn list_under(root: &Path) -> Result<String, String> {
    let mut files = Vec::new();
    let mut folders = vec![PathBuf::new()];
    while let Some(folder) = folders.pop() {
        let entries = std::fs::read_dir(root.join(&folder));
        let entries = match entries {
            Ok(entries) => entries,
            Err(e) if folder.as_os_str().is_empty() => {
                return Err(format!("the tool's folder cannot be listed ({})", e.kind()));
            }
            // An unreadable subfolder is skipped, not fatal.
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let relative = folder.join(entry.file_name());
            if kind.is_dir() {
                folders.push(relative);
            } else if kind.is_file() {
                let parts: Vec<String> = relative
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                files.push(parts.join("/"));
            }
        }
    }
    files.sort();
    let total = files.len();
    files.truncate(MAX_LISTED_FILES);
    let mut listing = files.join("\n");
    if total > MAX_LISTED_FILES {
        listing.push_str(&format!("\n… ({MAX_LISTED_FILES} of {total} files listed)"));
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    use axum::Router;
    use axum::extract::{Path as UrlPath, Query};
    use axum::http::{HeaderMap as Headers, StatusCode as Status};
    use axum::response::IntoResponse;
    use axum::routing::{get, post};
    use serde_json::json;

    use super::*;

    /// Headers of every request the fake server received, by route.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(&'static str, Headers)>>>);

    impl Seen {
        fn record(&self, route: &'static str, headers: Headers) {
            self.0.lock().unwrap().push((route, headers));
        }
        fn on(&self, route: &str) -> Vec<Headers> {
            let seen = self.0.lock().unwrap();
            seen.iter()
                .filter(|(r, _)| *r == route)
                .map(|(_, h)| h.clone())
                .collect()
        }
    }

    fn echo_headers(headers: &Headers) -> Value {
        let pick = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        json!({
            "authorization": pick("authorization"),
            "x-team": pick("x-team"),
            "user-agent": pick("user-agent"),
            "content-type": pick("content-type"),
        })
    }

    /// A real server on 127.0.0.1 with the routes the tests call; returns its address.
    async fn server(seen: Seen) -> String {
        let limited = Arc::new(AtomicU32::new(0));
        let s = [
            seen.clone(),
            seen.clone(),
            seen.clone(),
            seen.clone(),
            seen.clone(),
            seen.clone(),
        ];
        let [s1, s2, s3, s4, s5, s6] = s;
        let app = Router::new()
            .route(
                "/items/{id}",
                get(move |UrlPath(id): UrlPath<String>, Query(query): Query<BTreeMap<String, String>>, headers: Headers| async move {
                    s1.record("get", headers.clone());
                    axum::Json(json!({"id": id, "query": query, "headers": echo_headers(&headers)}))
                })
                .patch(move |UrlPath(id): UrlPath<String>, headers: Headers, body: String| async move {
                    s2.record("patch", headers.clone());
                    axum::Json(json!({"id": id, "body": serde_json::from_str::<Value>(&body).unwrap(), "headers": echo_headers(&headers)}))
                }),
            )
            .route(
                "/items",
                post(move |headers: Headers, body: String| async move {
                    s3.record("post", headers.clone());
                    axum::Json(json!({"body": serde_json::from_str::<Value>(&body).unwrap(), "headers": echo_headers(&headers)}))
                }),
            )
            .route(
                "/flaky",
                post(move |headers: Headers| async move {
                    s4.record("flaky", headers);
                    (Status::INTERNAL_SERVER_ERROR, "boom: database on fire")
                }),
            )
            .route(
                "/bad",
                post(move |headers: Headers| async move {
                    s5.record("bad", headers);
                    (Status::BAD_REQUEST, "field `qty` must be positive")
                }),
            )
            .route(
                "/limited",
                post(move || async move {
                    if limited.fetch_add(1, Ordering::SeqCst) == 0 {
                        (Status::TOO_MANY_REQUESTS, [("retry-after", "100")], "slow down").into_response()
                    } else {
                        "done".into_response()
                    }
                }),
            )
            .route(
                "/straddle",
                post(move |headers: Headers| async move {
                    // The secret straddles the 300 bytes an error shows.
                    let auth = headers["authorization"].to_str().unwrap().to_string();
                    (Status::INTERNAL_SERVER_ERROR, format!("{}{auth} and more", "x".repeat(290)))
                }),
            )
            .route(
                "/slow",
                post(move |headers: Headers| async move {
                    s6.record("slow", headers);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    "too late"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn agent(base: &str) -> Agent {
        let retry = "{max_attempts: 3, backoff: {initial: 10ms, max: 50ms}}";
        Agent::parse(&format!(
            r#"
name: ops
version: 1
model: {{provider: scripted, model: s, script: [{{content: hi}}]}}
tools:
  - name: get_item
    http:
      method: GET
      url: "{base}/items/{{id}}"
      headers: {{Authorization: "Bearer ${{KEEL_TEST_TOOL_TOKEN}}", X-Team: blue}}
  - name: create_item
    http: {{method: POST, url: "{base}/items"}}
  - name: rename_item
    http: {{method: PATCH, url: "{base}/items/{{id}}"}}
  - name: flaky
    http: {{url: "{base}/flaky", retry: {retry}}}
  - name: bad
    http: {{url: "{base}/bad", retry: {retry}}}
  - name: limited
    http: {{url: "{base}/limited", retry: {retry}}}
  - name: slow
    http: {{url: "{base}/slow", timeout: 200ms, retry: {{max_attempts: 2, backoff: {{initial: 10ms, max: 10ms}}}}}}
  - name: straddle
    http: {{url: "{base}/straddle", headers: {{Authorization: "Bearer ${{KEEL_TEST_TOOL_TOKEN}}"}}, retry: {{max_attempts: 1}}}}
  - name: unset_secret
    http: {{url: "{base}/items", headers: {{X-Key: "${{KEEL_TEST_SURELY_UNSET_TOOL_VAR}}"}}}}
"#
        ))
        .unwrap()
    }

    fn call(run_id: RunId, tool: &str, arguments: Value) -> Invocation {
        Invocation {
            step: 1,
            call_index: 0,
            tool: tool.into(),
            arguments,
            idempotency_key: keel_core::run::idempotency_key(run_id, 1, 0),
            attempt: 1,
        }
    }

    fn tools() -> Tools {
        Tools::new(Clients::build(reqwest::Client::builder))
            .with_env(|name| (name == "KEEL_TEST_TOOL_TOKEN").then(|| "s3cret-value".to_string()))
    }

    fn assert_traceparent(headers: &Headers, run_id: RunId) {
        let trace = headers["traceparent"].to_str().unwrap();
        let parts: Vec<&str> = trace.split('-').collect();
        assert_eq!(parts.len(), 4, "{trace}");
        assert_eq!(
            (parts[0], parts[1], parts[3]),
            ("00", run_id.trace_id().as_str(), "01")
        );
        assert_eq!(parts[2].len(), 16);
        assert!(
            parts[2]
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
    }

    #[tokio::test]
    async fn http_tools_send_arguments_and_headers() {
        let seen = Seen::default();
        let agent = agent(&server(seen.clone()).await);
        let tools = tools();
        let run_id = RunId::new();

        // GET: placeholder filled (encoded), the rest in the query string.
        let args = json!({"id": "a b/c", "q": "x&y", "n": 5, "tags": ["p", "q"]});
        let outcome = tools
            .invoke(&agent, Egress::Any, run_id, &call(run_id, "get_item", args))
            .await;
        assert!(!outcome.is_error, "{outcome:?}");
        let echo: Value = serde_json::from_str(&outcome.output).unwrap();
        assert_eq!(echo["id"], "a b/c");
        assert_eq!(
            echo["query"],
            json!({"n": "5", "q": "x&y", "tags": "[\"p\",\"q\"]"})
        );
        assert_eq!(echo["headers"]["x-team"], "blue");
        assert!(
            echo["headers"]["user-agent"]
                .as_str()
                .unwrap()
                .starts_with("keel/")
        );
        // The tool echoed the secret back: the model sees it redacted.
        assert_eq!(echo["headers"]["authorization"], "Bearer [redacted]");
        assert!(!outcome.output.contains("s3cret-value"));
        let received = &seen.on("get")[0];
        assert_eq!(received["authorization"], "Bearer s3cret-value");
        assert_eq!(
            received["idempotency-key"],
            format!("{run_id}:1:0").as_str()
        );
        assert_traceparent(received, run_id);

        // POST: the arguments as a JSON body.
        let args = json!({"name": "widget", "qty": 2});
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "create_item", args.clone()),
            )
            .await;
        let echo: Value = serde_json::from_str(&outcome.output).unwrap();
        assert_eq!(echo["body"], args);
        assert!(
            echo["headers"]["content-type"]
                .as_str()
                .unwrap()
                .starts_with("application/json")
        );

        // PATCH: the placeholder argument is not repeated in the body.
        let args = json!({"id": 7, "name": "gadget"});
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "rename_item", args),
            )
            .await;
        let echo: Value = serde_json::from_str(&outcome.output).unwrap();
        assert_eq!(echo["id"], "7");
        assert_eq!(echo["body"], json!({"name": "gadget"}));

        // Refused before any request.
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "rename_item", json!({"name": "x"})),
            )
            .await;
        assert!(
            outcome.is_error && outcome.output.contains("`id`"),
            "{outcome:?}"
        );
        let outcome = Tools::new(Clients::build(reqwest::Client::builder))
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "unset_secret", json!({})),
            )
            .await;
        assert!(outcome.is_error);
        assert!(
            outcome.output.contains("KEEL_TEST_SURELY_UNSET_TOOL_VAR"),
            "{outcome:?}"
        );
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "nope", json!({})),
            )
            .await;
        assert!(
            outcome.is_error && outcome.output.contains("unknown tool `nope`"),
            "{outcome:?}"
        );
        assert_eq!(seen.on("patch").len(), 1);
    }

    #[tokio::test]
    async fn http_tools_retry_what_can_succeed() {
        let seen = Seen::default();
        let agent = agent(&server(seen.clone()).await);
        let tools = tools();
        let run_id = RunId::new();

        // 500: retried up to max_attempts, with the same idempotency key each time.
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "flaky", json!({})),
            )
            .await;
        assert!(outcome.is_error);
        assert_eq!(
            outcome.output,
            "tool `flaky` failed after 3 attempts: HTTP 500 Internal Server Error: boom: database on fire"
        );
        let attempts = seen.on("flaky");
        assert_eq!(attempts.len(), 3);
        for headers in &attempts {
            assert_eq!(headers["idempotency-key"], format!("{run_id}:1:0").as_str());
            assert_traceparent(headers, run_id);
            // One call, one span: its retries name the same parent.
            assert_eq!(headers["traceparent"], attempts[0]["traceparent"]);
        }

        // 400: not retried.
        let outcome = tools
            .invoke(&agent, Egress::Any, run_id, &call(run_id, "bad", json!({})))
            .await;
        assert!(outcome.is_error);
        assert_eq!(
            outcome.output,
            "tool `bad` failed: HTTP 400 Bad Request: field `qty` must be positive"
        );
        assert_eq!(seen.on("bad").len(), 1);

        // 429 asking for 100s: the wait is capped at backoff.max (50ms).
        let started = Instant::now();
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "limited", json!({})),
            )
            .await;
        assert_eq!(outcome, Outcome::ok("done"));
        assert!(started.elapsed() < Duration::from_secs(5));

        // A handler slower than the 200ms timeout: both attempts time out.
        let started = Instant::now();
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "slow", json!({})),
            )
            .await;
        assert!(outcome.is_error);
        assert_eq!(
            outcome.output,
            "tool `slow` failed after 2 attempts: timed out after 200ms"
        );
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(seen.on("slow").len(), 2);

        // A secret cut by the error's length limit is still redacted whole.
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "straddle", json!({})),
            )
            .await;
        assert!(outcome.is_error);
        assert!(outcome.output.contains("Bearer [re"), "{outcome:?}");
        assert!(!outcome.output.contains("s3c"), "{outcome:?}");
    }

    #[test]
    fn secrets_of_urls() {
        let url = |text: &str| url_secrets(&reqwest::Url::parse(text).unwrap());
        assert_eq!(
            url("https://user:pa%20ss@h/x?q=cats&api_key=k%2Fey1&X-Amz-Signature=abcd&n=12345"),
            ["abcd", "k%2Fey1", "k/ey1", "pa%20ss"]
        );
        assert_eq!(url("https://t0ken@h/"), ["t0ken"]);
        assert!(url("https://h/x?format=json&token=abc").is_empty());
    }

    #[tokio::test]
    async fn builtins_stay_in_their_folder() {
        let base = std::env::temp_dir().join(format!("keel-tools-{}", RunId::new()));
        let root = base.join("data");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(base.join("secret.txt"), "outside").unwrap();
        std::fs::write(root.join("notes.md"), "buy milk").unwrap();
        std::fs::write(root.join("b.txt"), "b").unwrap();
        std::fs::write(root.join("sub/deeper/c.txt"), "c").unwrap();
        std::fs::write(root.join("sub/a.txt"), "a").unwrap();
        std::fs::write(root.join("binary.bin"), [0xff, 0xfe, 0x00, 0x81]).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(base.join("secret.txt"), root.join("link.txt")).unwrap();

        let agent = Agent::parse(&format!(
            "name: files\nversion: 1\nmodel: {{provider: scripted, model: s, script: [{{content: hi}}]}}\ntools:\n  - {{name: read, builtin: read_file, root: '{r}'}}\n  - {{name: list, builtin: list_files, root: '{r}'}}\n",
            r = root.display()
        ))
        .unwrap();
        let tools = tools();
        let run_id = RunId::new();
        let read = |path: &str| call(run_id, "read", json!({ "path": path }));

        assert_eq!(
            tools
                .invoke(&agent, Egress::Any, run_id, &read("notes.md"))
                .await,
            Outcome::ok("buy milk")
        );
        assert_eq!(
            tools
                .invoke(&agent, Egress::Any, run_id, &read("./sub/../sub/a.txt"))
                .await,
            Outcome::ok("a")
        );
        for (path, expected) in [
            ("../secret.txt", "outside the tool's folder"),
            ("sub/../../secret.txt", "outside the tool's folder"),
            ("/etc/passwd", "not a relative path"),
            ("missing.md", "no file `missing.md`"),
            ("sub", "not a file"),
            ("binary.bin", "not a UTF-8 text file"),
        ] {
            let outcome = tools.invoke(&agent, Egress::Any, run_id, &read(path)).await;
            assert!(outcome.is_error, "{path}: {outcome:?}");
            assert!(outcome.output.contains(expected), "{path}: {outcome:?}");
            assert!(
                outcome.output.contains(path) || path == "sub",
                "names the path: {outcome:?}"
            );
            assert!(!outcome.output.contains("outside\n") && outcome.output != "outside");
        }
        #[cfg(unix)]
        {
            let outcome = tools
                .invoke(&agent, Egress::Any, run_id, &read("link.txt"))
                .await;
            assert!(
                outcome.is_error && outcome.output.contains("outside the tool's folder"),
                "{outcome:?}"
            );
        }
        let outcome = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "read", json!({})),
            )
            .await;
        assert!(outcome.is_error);

        let listing = tools
            .invoke(
                &agent,
                Egress::Any,
                run_id,
                &call(run_id, "list", json!({})),
            )
            .await;
        assert_eq!(
            listing,
            Outcome::ok("b.txt\nbinary.bin\nnotes.md\nsub/a.txt\nsub/deeper/c.txt")
        );

        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn placeholders() {
        let mut args = json!({"id": "x/y z", "n": 3, "keep": true})
            .as_object()
            .unwrap()
            .clone();
        let no_env = |var: &str| Err(format!("`{var}` unset"));
        let url = fill_placeholders("http://h/a/{id}/{n}?raw={not a name}", &mut args, no_env);
        assert_eq!(url.unwrap(), "http://h/a/x%2Fy%20z/3?raw={not a name}");
        assert_eq!(Value::Object(args), json!({"keep": true}));

        // `${VAR}` is the server's environment, encoded; an argument that
        // looks like a reference stays text.
        let mut args = json!({"q": "${KEY}", "KEY": "not used"})
            .as_object()
            .unwrap()
            .clone();
        let env = |var: &str| match var {
            "KEY" => Ok("s3cr/t {q}".to_string()),
            _ => Err(format!("`{var}` unset")),
        };
        let url = fill_placeholders("http://h/{q}?k=${KEY}&raw=${not a name}", &mut args, env);
        assert_eq!(
            url.unwrap(),
            "http://h/%24%7BKEY%7D?k=s3cr%2Ft%20%7Bq%7D&raw=${not a name}"
        );
        assert_eq!(Value::Object(args), json!({"KEY": "not used"}));
        let mut args = Map::new();
        let missing = fill_placeholders("http://h/?k=${GONE}", &mut args, env);
        assert_eq!(missing.unwrap_err(), "`GONE` unset");
        assert_eq!(encode_component("é~"), "%C3%A9~");
    }
}
