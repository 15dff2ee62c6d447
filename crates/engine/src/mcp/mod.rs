//! MCP servers: their tools, discovered and cached, and calls to them.
//!
//! The configuration's `mcp_servers` are reached through rmcp (the official
//! Rust SDK), client side only: a stdio server is a child process Keel
//! spawns with a clean environment holding only its configured `env`; an
//! HTTP server speaks streamable HTTP. [`link`] connects each one (handshake:
//! `server/discover` of protocol 2026-07-28, falling back to `initialize` for
//! older servers), lists its tools, re-lists them on
//! `notifications/tools/list_changed` (asked for with `subscriptions/listen`
//! on a 2026-07-28 connection) and every `refresh`, reconnects (and
//! respawns) with backoff when the connection or the process dies, and kills
//! the process on shutdown; on Linux the kernel kills it if Keel dies.
//!
//! An agent uses a server through `tools: [{mcp: <server>, allow: [...]}]`.
//! [`Mcp::resolve`] turns the agent's pinned version into one holding the
//! server tools its `allow` lets through, shown to the model as
//! `<server>__<tool>` with the server's input schema, so the state machine
//! validates arguments before any call and refuses every other name like
//! an unknown tool. [`Mcp::call`] makes one `tools/call`, carrying the
//! call's idempotency key and the run's traceparent in the request's
//! `_meta` (`keel/idempotency_key`, `traceparent`); the text the server
//! answers is what the model reads, with the server's secrets redacted. A
//! call cut off by a dying connection has no answer: its outcome is
//! uncertain, and the worker treats it like a call whose worker died.

mod link;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use keel_core::RunId;
use keel_core::config::{Config, McpServerConfig};
use keel_core::run::Invocation;
use keel_core::spec::{Agent, McpTool, allows, clip, human_duration};
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, ClientRequest, MetaObject,
    RequestMetaObject, ServerResult,
};
use rmcp::service::PeerRequestOptions;
use rmcp::transport::streamable_http_client::StreamableHttpError;
use rmcp::{RoleClient, ServiceError};
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::tools::{MAX_OUTPUT_BYTES, Outcome};

/// The `_meta` key of a call's idempotency key (`<run_id>:<step>:<call_index>`).
pub const IDEMPOTENCY_KEY_META: &str = "keel/idempotency_key";

/// Secrets shorter than this are not searched for in outputs and logs.
const MIN_REDACTED_LEN: usize = 4;

/// The wait before sending again a call that could not be sent.
const RESEND_PAUSE: Duration = Duration::from_millis(250);

/// The MCP servers of this process. Cheap to clone.
#[derive(Clone, Default)]
pub struct Mcp {
    servers: Arc<BTreeMap<String, Arc<Server>>>,
    resolved: Arc<Mutex<Resolved>>,
}

/// Resolved agents by the pinned version's address, with the catalog
/// generations they were built from. The weak reference to the pinned
/// version keeps its address from being reused while the entry exists, and
/// tells when the version has left the agent cache (and every run): such
/// entries are dropped.
type Resolved = HashMap<usize, (Weak<Agent>, Vec<u64>, Arc<Agent>)>;

impl fmt::Debug for Mcp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mcp")
            .field("servers", &self.servers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// One configured server and what is known of it.
struct Server {
    name: String,
    config: McpServerConfig,
    status: watch::Sender<Status>,
}

/// What the supervisor of a server publishes.
#[derive(Clone, Default)]
struct Status {
    /// The live connection, if any.
    peer: Option<rmcp::Peer<RoleClient>>,
    /// The last tool list (kept while reconnecting).
    catalog: Option<Arc<Catalog>>,
    /// Why the last connection attempt or listing failed (redacted).
    error: Option<String>,
    /// Values of the secrets the server was given, redacted from its
    /// outputs, errors and log lines.
    secrets: Arc<Vec<String>>,
}

/// A server's tool list.
struct Catalog {
    tools: Vec<McpTool>,
    /// Bumped each time the list changes.
    generation: u64,
}

impl Mcp {
    /// The servers of `config` (none are contacted until [`Mcp::run`]).
    pub fn new(config: &Config) -> Mcp {
        let servers = config
            .mcp_servers
            .iter()
            .map(|(name, config)| {
                let server = Server {
                    name: name.clone(),
                    config: config.clone(),
                    status: watch::Sender::new(Status::default()),
                };
                (name.clone(), Arc::new(server))
            })
            .collect();
        Mcp {
            servers: Arc::new(servers),
            resolved: Arc::default(),
        }
    }

    /// Whether no server is configured.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Connects every server and keeps it connected until `cancel`, then
    /// closes the connections and stops the processes.
    pub async fn run(self, http: reqwest::Client, cancel: CancellationToken) {
        let mut supervisors = tokio::task::JoinSet::new();
        for server in self.servers.values() {
            supervisors.spawn(link::supervise(
                server.clone(),
                http.clone(),
                cancel.clone(),
            ));
        }
        while supervisors.join_next().await.is_some() {}
    }

    /// The agent with the MCP tools it may use, from each server's last
    /// tool list. The error says which server it uses has not listed its
    /// tools yet (within that server's `timeout`): the model must not be
    /// asked without them. The agent returned then lacks only those tools.
    pub async fn resolve(&self, agent: Arc<Agent>) -> (Arc<Agent>, Option<String>) {
        let used: Vec<&str> = agent.mcp_servers().map(|(server, _)| server).collect();
        if used.is_empty() {
            return (agent, None);
        }
        let mut generations = Vec::with_capacity(used.len());
        let mut listed = Vec::new();
        let mut error = None;
        for name in used {
            let Some(server) = self.servers.get(name) else {
                error = Some(format!(
                    "mcp server `{name}` is not in the server configuration (mcp_servers)"
                ));
                generations.push(0);
                continue;
            };
            match server.catalog().await {
                Ok(catalog) => {
                    generations.push(catalog.generation);
                    listed.extend(catalog.tools.iter().cloned());
                }
                Err(message) => {
                    generations.push(0);
                    error = Some(message);
                }
            }
        }
        let key = Arc::as_ptr(&agent) as usize;
        if let Some((_, seen, resolved)) = self.cache().get(&key)
            && *seen == generations
        {
            return (resolved.clone(), error);
        }
        let (resolved, skipped) = agent.with_mcp_tools(&listed);
        for reason in skipped {
            warn!(agent = %agent.spec.name, version = %agent.spec.version, "{reason}");
        }
        let resolved = Arc::new(resolved);
        let mut cache = self.cache();
        // Versions that left the agent cache and every run go.
        cache.retain(|_, (pinned, _, _)| pinned.strong_count() > 0);
        cache.insert(key, (Arc::downgrade(&agent), generations, resolved.clone()));
        (resolved, error)
    }

    /// Makes one call of an MCP tool the agent may use. Never fails: every
    /// error becomes an error outcome the model reads, except a call cut
    /// off after it was sent (the connection died before an answer), which
    /// is [`Outcome::uncertain`]. A call that could not be sent waits for
    /// the server's next connection, within its `timeout`; a call with no
    /// answer within the `timeout` is cancelled and reads as an error.
    pub async fn call(
        &self,
        agent: &Agent,
        tool: &McpTool,
        run_id: RunId,
        call: &Invocation,
        span_id: u64,
    ) -> Outcome {
        // The resolved agent only holds allowed tools; check again anyway.
        let allowed = agent
            .mcp_servers()
            .any(|(server, allow)| server == tool.server && allows(allow, &tool.tool));
        if !allowed {
            return Outcome::error(format!("unknown tool `{}`", call.tool));
        }
        let Some(server) = self.servers.get(&tool.server) else {
            return Outcome::error(format!(
                "tool `{}` was not called: mcp server `{}` is not configured",
                call.tool, tool.server
            ));
        };
        let arguments = match &call.arguments {
            Value::Object(map) => map.clone(),
            Value::Null => Map::new(),
            other => {
                return Outcome::error(format!(
                    "tool `{}` was not called: arguments must be a JSON object, got {other}",
                    call.tool
                ));
            }
        };
        let mut meta = MetaObject::new();
        meta.insert(
            IDEMPOTENCY_KEY_META.into(),
            Value::String(call.idempotency_key.clone()),
        );
        meta.set_traceparent(crate::trace::traceparent(run_id, span_id));
        let mut params = CallToolRequestParams::new(tool.tool.clone()).with_arguments(arguments);
        params.meta = Some(RequestMetaObject(meta));

        // Until the request reaches the server, a connection that closes
        // only delays the call: wait for the supervisor's next one, within
        // the timeout.
        let timeout = server.config.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let (answer, secrets) = loop {
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            let status = match server.connected(wait).await {
                Ok(status) => status,
                Err(message) => {
                    return Outcome::error(format!(
                        "tool `{}` was not called: {message}",
                        call.tool
                    ));
                }
            };
            let Some(peer) = status.peer.clone() else {
                return Outcome::error(format!(
                    "tool `{}` was not called: mcp server `{}` is not connected",
                    call.tool, tool.server
                ));
            };
            let request = ClientRequest::CallToolRequest(CallToolRequest::new(params.clone()));
            // The answer is awaited at most `timeout`; past it the server
            // is told the call is cancelled.
            let options = PeerRequestOptions::with_timeout(timeout);
            let answer = match peer.send_cancellable_request(request, options).await {
                Ok(sent) => sent.await_response().await,
                // The connection had ended: the request never left.
                Err(ServiceError::TransportClosed) => continue,
                Err(e) => Err(e),
            };
            match answer {
                Err(e) if failure(&e) == Failure::NotSent => {
                    let message = redact(&e.to_string(), &status.secrets);
                    if tokio::time::Instant::now() + RESEND_PAUSE >= deadline {
                        return Outcome::error(format!(
                            "tool `{}` was not called: {message}",
                            call.tool
                        ));
                    }
                    debug!(run_id = %run_id, server = %tool.server, tool = %tool.tool, error = %message, "mcp tool call not sent, trying again");
                    tokio::time::sleep(RESEND_PAUSE).await;
                }
                answer => break (answer, status.secrets.clone()),
            }
        };

        let redact = |text: &str| redact(text, &secrets);
        match answer {
            Ok(ServerResult::CallToolResult(result)) => {
                let (text, is_error) = result_text(&result);
                let output = clip(&redact(&text), MAX_OUTPUT_BYTES);
                if is_error {
                    Outcome::error(output)
                } else {
                    Outcome::ok(output)
                }
            }
            // `{}`: a result without content.
            Ok(ServerResult::EmptyResult(_)) => Outcome::ok(""),
            Ok(_) => Outcome::error(format!(
                "tool `{}` failed: the server answered with something other than a tool result",
                call.tool
            )),
            Err(ServiceError::Timeout { .. }) => {
                // The server is alive but slow: it is told to cancel, and
                // the model is told the call may have run (as for an HTTP
                // tool's timeout).
                warn!(run_id = %run_id, server = %tool.server, tool = %tool.tool, "mcp tool call timed out");
                Outcome::error(format!(
                    "tool `{}` failed: no answer within {} (it may have run)",
                    call.tool,
                    human_duration::format(timeout)
                ))
            }
            Err(e) => {
                let message = redact(&e.to_string());
                if failure(&e) == Failure::Cut {
                    warn!(run_id = %run_id, server = %tool.server, tool = %tool.tool, error = %message, "mcp tool call cut off, it may or may not have happened");
                    Outcome::uncertain(format!(
                        "tool `{}` was cut off: the connection to mcp server `{}` broke before it answered ({message})",
                        call.tool, tool.server
                    ))
                } else {
                    warn!(run_id = %run_id, server = %tool.server, tool = %tool.tool, error = %message, "mcp tool call failed");
                    Outcome::error(format!("tool `{}` failed: {message}", call.tool))
                }
            }
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Resolved> {
        // A poisoned cache only means a panic mid-insert; the map is still valid.
        self.resolved.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Server {
    /// The last tool list, waiting up to the server's timeout for a first one.
    async fn catalog(&self) -> Result<Arc<Catalog>, String> {
        let status = self
            .wait(self.config.timeout, |s| s.catalog.is_some())
            .await?;
        status
            .catalog
            .clone()
            .ok_or_else(|| format!("mcp server `{}` has listed no tools yet", self.name))
    }

    /// The status once connected, waiting up to `timeout` (also for the
    /// replacement of a connection that closed but is still published: the
    /// supervisor may not have seen it yet).
    async fn connected(&self, timeout: Duration) -> Result<Status, String> {
        self.wait(timeout, |s| {
            s.peer.as_ref().is_some_and(|p| !p.is_transport_closed())
        })
        .await
    }

    async fn wait(
        &self,
        timeout: Duration,
        ready: impl Fn(&Status) -> bool,
    ) -> Result<Status, String> {
        let mut status = self.status.subscribe();
        let waited = tokio::time::timeout(timeout, status.wait_for(|s| ready(s))).await;
        match waited {
            Ok(Ok(status)) => Ok(status.clone()),
            _ => {
                let why = self
                    .status
                    .borrow()
                    .error
                    .clone()
                    .unwrap_or_else(|| "no connection yet".into());
                Err(format!(
                    "mcp server `{}` is not reachable (waited {}): {why}",
                    self.name,
                    human_duration::format(timeout)
                ))
            }
        }
    }
}

/// The text of a tool result: its text blocks, one per line (other blocks
/// named by kind), else its structured content as JSON; and whether the
/// server marked it an error.
fn result_text(result: &CallToolResult) -> (String, bool) {
    let mut parts = Vec::new();
    for block in &result.content {
        match block.as_text() {
            Some(text) => parts.push(text.text.clone()),
            None => {
                let kind = serde_json::to_value(block)
                    .ok()
                    .and_then(|v| v.get("type").and_then(Value::as_str).map(str::to_string))
                    .unwrap_or_else(|| "content".into());
                parts.push(format!("[{kind} omitted]"));
            }
        }
    }
    if parts.is_empty()
        && let Some(structured) = &result.structured_content
    {
        parts.push(structured.to_string());
    }
    (parts.join("\n"), result.is_error == Some(true))
}

/// What a failed call's error says about whether the server got it.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// It never reached the server: writing to the process failed (it is
    /// gone), or no HTTP connection could be made.
    NotSent,
    /// It was sent and the connection broke before an answer: the process
    /// exited, the HTTP connection or response stream was cut. Whether it
    /// happened is unknown.
    Cut,
    /// The server answered (an error, an HTTP status, something
    /// unreadable), or the call failed on this side.
    Answered,
}

/// Sorts an error of a call already handed to the connection.
fn failure(error: &ServiceError) -> Failure {
    let ServiceError::TransportSend(error) = error else {
        return match error {
            // The connection ended with the request pending.
            ServiceError::TransportClosed => Failure::Cut,
            _ => Failure::Answered,
        };
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error.error.as_ref());
    while let Some(current) = source {
        if let Some(http) = current.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            return match http {
                StreamableHttpError::Client(e) if e.is_connect() || e.is_builder() => {
                    Failure::NotSent
                }
                StreamableHttpError::Client(_)
                | StreamableHttpError::Io(_)
                | StreamableHttpError::Sse(_)
                | StreamableHttpError::UnexpectedEndOfStream
                | StreamableHttpError::TokioJoinError(_)
                | StreamableHttpError::TransportChannelClosed
                | StreamableHttpError::SessionRecoveryTimeout
                | StreamableHttpError::ControlRequestTimeout => Failure::Cut,
                _ => Failure::Answered,
            };
        }
        if current.is::<std::io::Error>() {
            // Writing a line to the process's stdin failed: it was not read.
            return Failure::NotSent;
        }
        source = current.source();
    }
    // Another transport's error: assume the worst.
    Failure::Cut
}

/// `text` with every secret replaced by `[redacted]`.
fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for secret in secrets {
        if secret.len() >= MIN_REDACTED_LEN {
            text = text.replace(secret.as_str(), "[redacted]");
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::ContentBlock as Content;

    #[test]
    fn results_read_as_text_and_secrets_are_redacted() {
        let mut result = CallToolResult::success(vec![Content::text("a"), Content::text("b")]);
        assert_eq!(result_text(&result), ("a\nb".to_string(), false));
        result.is_error = Some(true);
        assert!(result_text(&result).1);
        let mut structured = CallToolResult::success(Vec::new());
        structured.structured_content = Some(serde_json::json!({"sum": 3}));
        assert_eq!(result_text(&structured).0, r#"{"sum":3}"#);
        let secrets = vec!["hunter22".to_string(), "abc".to_string()];
        assert_eq!(
            redact("token=hunter22 abc", &secrets),
            "token=[redacted] abc"
        );
    }

    /// An agent resolved with the servers' tools is kept while its pinned
    /// version lives (in the agent cache, in a run), and dropped after.
    #[tokio::test]
    async fn resolved_agents_go_with_their_version() {
        let config = Config::from_value(serde_json::json!({
            "mcp_servers": {"fx": {"stdio": {"command": "true"}, "timeout": "10ms"}}
        }))
        .expect("config");
        let mcp = Mcp::new(&config);
        let agent = |name: &str| {
            let spec = serde_json::json!({
                "name": name,
                "version": "1",
                "model": {"provider": "scripted", "model": "s", "script": [{"content": "done"}]},
                "tools": [{"mcp": "fx", "allow": ["*"]}]
            });
            Arc::new(Agent::from_value(spec).expect("spec"))
        };
        let first = agent("a");
        let (resolved, error) = mcp.resolve(first.clone()).await;
        assert!(error.is_some(), "the server never listed its tools");
        let (again, _) = mcp.resolve(first.clone()).await;
        assert!(Arc::ptr_eq(&resolved, &again), "resolved once");
        drop(first);
        let second = agent("b");
        mcp.resolve(second.clone()).await;
        assert_eq!(mcp.cache().len(), 1);
        mcp.resolve(second).await;
        assert_eq!(mcp.cache().len(), 1);
    }

    #[tokio::test]
    async fn errors_say_whether_a_call_was_sent() {
        use rmcp::transport::DynamicTransportError;
        use std::any::TypeId;
        let send = |error: Box<dyn std::error::Error + Send + Sync>| {
            ServiceError::TransportSend(DynamicTransportError::from_parts(
                "test",
                TypeId::of::<()>(),
                error,
            ))
        };
        type Http = StreamableHttpError<reqwest::Error>;

        // The connection ended with the call pending: unknown.
        assert_eq!(failure(&ServiceError::TransportClosed), Failure::Cut);
        assert_eq!(
            failure(&send(Box::new(Http::UnexpectedEndOfStream))),
            Failure::Cut
        );
        // Writing to a dead process failed; no HTTP connection was made.
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert_eq!(failure(&send(Box::new(pipe))), Failure::NotSent);
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let refused = reqwest::Client::new()
            .post(format!("http://{closed}/mcp"))
            .send()
            .await
            .expect_err("nothing listens there");
        assert_eq!(
            failure(&send(Box::new(Http::Client(refused)))),
            Failure::NotSent
        );
        // The server answered.
        let answered = ServiceError::McpError(rmcp::ErrorData::internal_error("no", None));
        assert_eq!(failure(&answered), Failure::Answered);
        let garbled = Http::UnexpectedServerResponse("<html>".into());
        assert_eq!(failure(&send(Box::new(garbled))), Failure::Answered);
        assert_eq!(
            failure(&ServiceError::Timeout {
                timeout: Duration::from_secs(1)
            }),
            Failure::Answered
        );
    }
}
