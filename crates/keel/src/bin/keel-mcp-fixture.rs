//! `keel-mcp-fixture`: a small MCP server for Keel's tests, over stdio (the
//! default) or streamable HTTP (`--http 127.0.0.1:PORT`, endpoint `/mcp`).
//!
//! ```text
//! keel-mcp-fixture [--http ADDR] [--legacy] [--record FILE] [--linger]
//! ```
//!
//! * `--legacy`: answers `server/discover` with "method not found", as a
//!   server of protocol 2025-11-25 does, so the client falls back to the
//!   `initialize` handshake (without it the fixture speaks 2026-07-28).
//! * `--record FILE`: appends one JSON line at start (`{"started": pid}`),
//!   per handshake (`{"handshake": "server/discover" | "initialize"}`), per
//!   `subscriptions/listen` (`{"listen": filter}`), per `tools/list`
//!   (`{"listed": [names]}`) and per tool call (`{"tool", "arguments",
//!   "meta"}`: the request's `_meta` as received).
//! * `--linger`: over stdio, keeps running after stdin closes (as a server
//!   that ignores EOF does), until killed.
//!
//! Tools: `echo {text}`, `add {a, b}` (integers, nothing else), `create_issue
//! {title}`, `secret` (the `FIXTURE_TOKEN` of its environment and the
//! `Authorization` header it got), `env` (the names of its environment
//! variables), `fail` (an error result), `crash` (exits mid-call, the first
//! time for an idempotency key: later calls with that key, in this process
//! or the next one, answer; without `--record` it always exits), `slow
//! {ms}` (answers after that long; the stdio server does nothing else
//! meanwhile), `register_tool {name}` (adds a tool `name`, answering `hello
//! from <name>`, and says the list changed: on 2026-07-28 on every
//! `subscriptions/listen` stream that asked for it, as the protocol
//! wants, on 2025-11-25 unasked; over stdio it answers only once the
//! client has listed the tools again, over HTTP it has no stream to notify
//! on).
//! On start it writes its token to stderr, so tests can check that Keel's
//! logs never show it.
//!
//! Written by hand as raw JSON-RPC rather than with rmcp's server side: the
//! server features (macros, schemars, an HTTP server stack) would be built
//! into the workspace for one fixture, and a server written from the wire
//! format checks that Keel's client speaks the protocol, not merely that it
//! agrees with the library it is built on. It is a binary of the `keel`
//! package so the integration tests can spawn it (`CARGO_BIN_EXE_*`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const USAGE: &str = "usage: keel-mcp-fixture [--http ADDR] [--legacy] [--record FILE] [--linger]";

/// The `_meta` key naming the `subscriptions/listen` request a
/// notification belongs to.
const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

#[derive(Default)]
struct Fixture {
    legacy: bool,
    /// Over stdio (it can notify and hold answers back).
    stdio: bool,
    record: Option<Mutex<std::fs::File>>,
    record_path: Option<PathBuf>,
    /// Tools added by `register_tool`.
    added: Mutex<Vec<String>>,
    /// Open `subscriptions/listen` requests that asked for tool list changes.
    listens: Mutex<Vec<Value>>,
    /// Answers held back until the next `tools/list` is answered.
    held: Mutex<Vec<Value>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn main() -> std::process::ExitCode {
    let mut http = None;
    let mut linger = false;
    let mut fixture = Fixture::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--http" => http = args.next(),
            "--legacy" => fixture.legacy = true,
            "--linger" => linger = true,
            "--record" => {
                let Some(path) = args.next().map(PathBuf::from) else {
                    eprintln!("{USAGE}");
                    return std::process::ExitCode::from(2);
                };
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                {
                    Ok(file) => {
                        fixture.record = Some(Mutex::new(file));
                        fixture.record_path = Some(path);
                    }
                    Err(e) => {
                        eprintln!("keel-mcp-fixture: cannot open {}: {e}", path.display());
                        return std::process::ExitCode::from(2);
                    }
                }
            }
            _ => {
                eprintln!("{USAGE}");
                return std::process::ExitCode::from(2);
            }
        }
    }
    let token = std::env::var("FIXTURE_TOKEN").unwrap_or_default();
    eprintln!("keel-mcp-fixture: ready (token {token})");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keel-mcp-fixture: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    fixture.record(json!({"started": std::process::id()}));
    fixture.stdio = http.is_none();
    let fixture = Arc::new(fixture);
    let result = runtime.block_on(async move {
        match http {
            Some(addr) => serve_http(fixture, &addr).await,
            None => {
                let served = serve_stdio(fixture).await;
                if linger {
                    std::future::pending::<()>().await;
                }
                served
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel-mcp-fixture: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// One JSON-RPC message per line on stdin, answers (and notifications) on
/// stdout; ends at EOF.
async fn serve_stdio(fixture: Arc<Fixture>) -> std::io::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let out = match serde_json::from_str::<Value>(&line) {
            Ok(message) => fixture.handle(&message, None),
            Err(e) => vec![error(Value::Null, -32700, &format!("parse error: {e}"))],
        };
        for message in out {
            stdout.write_all(format!("{message}\n").as_bytes()).await?;
        }
        stdout.flush().await?;
    }
    Ok(())
}

/// Streamable HTTP: a POST per message, answered with a JSON body (202
/// without one for notifications); no GET stream, no session.
async fn serve_http(fixture: Arc<Fixture>, addr: &str) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}/mcp", listener.local_addr()?);
    let app = Router::new().route(
        "/mcp",
        post(move |headers: HeaderMap, body: String| {
            let fixture = fixture.clone();
            async move { post_message(&fixture, &headers, &body) }
        })
        .get(|| async { StatusCode::METHOD_NOT_ALLOWED })
        .delete(|| async { StatusCode::OK }),
    );
    axum::serve(listener, app).await
}

fn post_message(fixture: &Fixture, headers: &HeaderMap, body: &str) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let message: Value = match serde_json::from_str(body) {
        Ok(message) => message,
        Err(e) => {
            let answer = error(Value::Null, -32700, &format!("parse error: {e}"));
            return (StatusCode::BAD_REQUEST, axum::Json(answer)).into_response();
        }
    };
    // Only the answer to this request goes back (no stream for the rest).
    let id = message.get("id");
    let answer = fixture
        .handle(&message, auth)
        .into_iter()
        .find(|m| id.is_some() && m.get("id") == id && m.get("method").is_none());
    match answer {
        Some(answer) => axum::Json(answer).into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    }
}

impl Fixture {
    /// What one message makes the fixture send, in order: notifications
    /// and answers (nothing for most notifications).
    fn handle(&self, message: &Value, auth: Option<&str>) -> Vec<Value> {
        let method = message.get("method").and_then(Value::as_str).unwrap_or("");
        let params = message.get("params").cloned().unwrap_or(Value::Null);
        let Some(id) = message.get("id").cloned() else {
            if method == "notifications/cancelled" {
                let cancelled = params.get("requestId");
                lock(&self.listens).retain(|l| Some(l) != cancelled);
            }
            return Vec::new();
        };
        let result = match method {
            "server/discover" if self.legacy => {
                return vec![error(id, -32601, "Method not found")];
            }
            "server/discover" => {
                self.record(json!({"handshake": method}));
                json!({
                    "resultType": "complete",
                    "supportedVersions": ["2026-07-28", "2025-11-25"],
                    "capabilities": {"tools": {"listChanged": true}},
                    "ttlMs": 0,
                    "cacheScope": "private",
                    "_meta": {"io.modelcontextprotocol/serverInfo": server_info()}
                })
            }
            "initialize" => {
                self.record(json!({"handshake": method}));
                json!({
                    "protocolVersion": "2025-11-25",
                    "capabilities": {"tools": {"listChanged": true}},
                    "serverInfo": server_info()
                })
            }
            "ping" => json!({}),
            "subscriptions/listen" if self.stdio && !self.legacy => {
                // Held open: list changes are sent on it, never answered.
                let filter = params.get("notifications").cloned().unwrap_or(json!({}));
                self.record(json!({"listen": filter}));
                let tools = filter.get("toolsListChanged") == Some(&json!(true));
                if tools {
                    lock(&self.listens).push(id.clone());
                }
                let accepted = if tools {
                    json!({"toolsListChanged": true})
                } else {
                    json!({})
                };
                return vec![json!({
                    "jsonrpc": "2.0",
                    "method": "notifications/subscriptions/acknowledged",
                    "params": {"_meta": {SUBSCRIPTION_ID: id}, "notifications": accepted}
                })];
            }
            "tools/list" => {
                let tools = self.tools();
                let names: Vec<Value> = tools
                    .as_array()
                    .map(|t| t.iter().map(|t| t["name"].clone()).collect())
                    .unwrap_or_default();
                self.record(json!({"listed": names}));
                let answer = json!({"jsonrpc": "2.0", "id": id, "result": {"tools": tools}});
                let mut out = vec![answer];
                out.append(&mut lock(&self.held));
                return out;
            }
            "tools/call" => {
                let name = params.get("name").and_then(Value::as_str).unwrap_or("");
                let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
                let meta = params.get("_meta").cloned().unwrap_or(Value::Null);
                self.record(json!({"tool": name, "arguments": arguments, "meta": meta}));
                let key = meta.get("keel/idempotency_key").and_then(Value::as_str);
                let mut out = Vec::new();
                let result = self.call(name, &arguments, auth, key, &mut out);
                let answer = json!({"jsonrpc": "2.0", "id": id, "result": result});
                if name == "register_tool" && !out.is_empty() {
                    // Answered once the client has listed the tools again.
                    lock(&self.held).push(answer);
                } else {
                    out.push(answer);
                }
                return out;
            }
            _ => return vec![error(id, -32601, &format!("Method not found: {method}"))],
        };
        vec![json!({"jsonrpc": "2.0", "id": id, "result": result})]
    }

    /// Its tools: the fixed ones and those `register_tool` added.
    fn tools(&self) -> Value {
        let mut tools = tools();
        if let Some(list) = tools.as_array_mut() {
            for name in lock(&self.added).iter() {
                list.push(json!({
                    "name": name,
                    "description": "Added at runtime.",
                    "inputSchema": {"type": "object", "properties": {}}
                }));
            }
        }
        tools
    }

    /// The result of one tool call; notifications it causes go to `out`.
    fn call(
        &self,
        name: &str,
        arguments: &Value,
        auth: Option<&str>,
        key: Option<&str>,
        out: &mut Vec<Value>,
    ) -> Value {
        match name {
            "crash" => {
                if self.calls_with_key("crash", key) > 1 {
                    return text("back after a crash".into());
                }
                std::process::exit(3)
            }
            "register_tool" => {
                let Some(added) = arguments.get("name").and_then(Value::as_str) else {
                    return failure("register_tool needs a `name` string");
                };
                {
                    let mut tools = lock(&self.added);
                    if !tools.iter().any(|t| t == added) {
                        tools.push(added.to_string());
                    }
                }
                let changed = "notifications/tools/list_changed";
                if self.legacy && self.stdio {
                    out.push(json!({"jsonrpc": "2.0", "method": changed}));
                } else if self.stdio {
                    for listen in lock(&self.listens).iter() {
                        out.push(json!({
                            "jsonrpc": "2.0",
                            "method": changed,
                            "params": {"_meta": {SUBSCRIPTION_ID: listen}}
                        }));
                    }
                }
                text(format!("added `{added}`"))
            }
            other if lock(&self.added).iter().any(|t| t == other) => {
                text(format!("hello from {other}"))
            }
            _ => call(name, arguments, auth),
        }
    }

    /// How many calls of `tool` with idempotency key `key` the record file
    /// holds, from every process that wrote it (0 without one).
    fn calls_with_key(&self, tool: &str, key: Option<&str>) -> usize {
        let Some(path) = &self.record_path else {
            return 0;
        };
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["tool"] == tool && l["meta"]["keel/idempotency_key"].as_str() == key)
            .count()
    }

    fn record(&self, line: Value) {
        let Some(file) = &self.record else { return };
        let mut file = lock(file);
        let _ = writeln!(file, "{line}");
        let _ = file.flush();
    }
}

fn server_info() -> Value {
    json!({"name": "keel-mcp-fixture", "version": env!("CARGO_PKG_VERSION")})
}

fn error(id: Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn tools() -> Value {
    let none = json!({"type": "object", "properties": {}});
    json!([
        {
            "name": "echo",
            "description": "Says the text back.",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
        },
        {
            "name": "add",
            "description": "Adds two integers.",
            "inputSchema": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
                "additionalProperties": false
            }
        },
        {
            "name": "create_issue",
            "description": "Opens an issue.",
            "inputSchema": {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
        },
        {"name": "secret", "description": "Shows the secrets it was given.", "inputSchema": none},
        {"name": "env", "description": "Names its environment variables.", "inputSchema": none},
        {"name": "fail", "description": "Fails.", "inputSchema": none},
        {"name": "crash", "description": "Exits mid-call (the first time for a key).", "inputSchema": none},
        {
            "name": "register_tool",
            "description": "Adds a tool and says the list changed.",
            "inputSchema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
        },
        {
            "name": "slow",
            "description": "Answers after a while.",
            "inputSchema": {"type": "object", "properties": {"ms": {"type": "integer", "minimum": 0}}, "required": ["ms"]}
        }
    ])
}

/// A text result.
fn text(text: String) -> Value {
    json!({"content": [{"type": "text", "text": text}], "isError": false})
}

/// The result of a call of one of the fixed tools.
fn call(name: &str, arguments: &Value, auth: Option<&str>) -> Value {
    let arg = |key: &str| arguments.get(key).cloned().unwrap_or(Value::Null);
    match name {
        "echo" => text(arg("text").as_str().unwrap_or_default().to_string()),
        "add" => match (arg("a").as_i64(), arg("b").as_i64()) {
            (Some(a), Some(b)) => text(a.saturating_add(b).to_string()),
            _ => failure("add needs integers a and b"),
        },
        "create_issue" => text(format!(
            "created issue `{}`",
            arg("title").as_str().unwrap_or_default()
        )),
        "secret" => text(format!(
            "token={} authorization={}",
            std::env::var("FIXTURE_TOKEN").unwrap_or_else(|_| "unset".into()),
            auth.unwrap_or("none")
        )),
        "env" => {
            let mut names: Vec<String> = std::env::vars_os()
                .map(|(k, _)| k.to_string_lossy().into_owned())
                .collect();
            names.sort();
            text(names.join(","))
        }
        "fail" => failure("the fixture failed on purpose"),
        "slow" => {
            let ms = arg("ms").as_u64().unwrap_or(0).min(60_000);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            text("slept".into())
        }
        other => failure(&format!("no tool `{other}`")),
    }
}

fn failure(message: &str) -> Value {
    json!({"content": [{"type": "text", "text": message}], "isError": true})
}
