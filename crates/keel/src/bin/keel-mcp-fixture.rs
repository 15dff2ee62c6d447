//! `keel-mcp-fixture`: a small MCP server for Keel's tests, over stdio (the
//! default) or streamable HTTP (`--http 127.0.0.1:PORT`, endpoint `/mcp`).
//!
//! ```text
//! keel-mcp-fixture [--http ADDR] [--legacy] [--record FILE]
//! ```
//!
//! * `--legacy`: answers `server/discover` with "method not found", as a
//!   server of protocol 2025-11-25 does, so the client falls back to the
//!   `initialize` handshake (without it the fixture speaks 2026-07-28).
//! * `--record FILE`: appends one JSON line at start (`{"started": pid}`),
//!   per handshake (`{"handshake": "server/discover" | "initialize"}`) and
//!   per tool call (`{"tool", "arguments", "meta"}`: the request's `_meta`
//!   as received).
//!
//! Tools: `echo {text}`, `add {a, b}` (integers, nothing else), `create_issue
//! {title}`, `secret` (the `FIXTURE_TOKEN` of its environment and the
//! `Authorization` header it got), `env` (the names of its environment
//! variables), `fail` (an error result), `crash` (exits mid-call), `slow
//! {ms}` (answers after that long; the stdio server does nothing else
//! meanwhile).
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

const USAGE: &str = "usage: keel-mcp-fixture [--http ADDR] [--legacy] [--record FILE]";

#[derive(Default)]
struct Fixture {
    legacy: bool,
    record: Option<Mutex<std::fs::File>>,
}

fn main() -> std::process::ExitCode {
    let mut http = None;
    let mut fixture = Fixture::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--http" => http = args.next(),
            "--legacy" => fixture.legacy = true,
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
                    Ok(file) => fixture.record = Some(Mutex::new(file)),
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
    let fixture = Arc::new(fixture);
    let result = runtime.block_on(async move {
        match http {
            Some(addr) => serve_http(fixture, &addr).await,
            None => serve_stdio(fixture).await,
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

/// One JSON-RPC message per line on stdin, answers on stdout; ends at EOF.
async fn serve_stdio(fixture: Arc<Fixture>) -> std::io::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Ok(message) => fixture.handle(&message, None),
            Err(e) => Some(error(Value::Null, -32700, &format!("parse error: {e}"))),
        };
        if let Some(answer) = answer {
            stdout.write_all(format!("{answer}\n").as_bytes()).await?;
            stdout.flush().await?;
        }
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
    match fixture.handle(&message, auth) {
        Some(answer) => axum::Json(answer).into_response(),
        None => StatusCode::ACCEPTED.into_response(),
    }
}

impl Fixture {
    /// The answer to one message (`None` for a notification).
    fn handle(&self, message: &Value, auth: Option<&str>) -> Option<Value> {
        let id = message.get("id")?.clone();
        let method = message.get("method").and_then(Value::as_str).unwrap_or("");
        let params = message.get("params").cloned().unwrap_or(Value::Null);
        let result = match method {
            "server/discover" if self.legacy => {
                return Some(error(id, -32601, "Method not found"));
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
            "tools/list" => json!({"tools": tools()}),
            "tools/call" => {
                let name = params.get("name").and_then(Value::as_str).unwrap_or("");
                let arguments = params.get("arguments").cloned().unwrap_or(json!({}));
                self.record(json!({
                    "tool": name,
                    "arguments": arguments,
                    "meta": params.get("_meta").cloned().unwrap_or(Value::Null)
                }));
                call(name, &arguments, auth)
            }
            _ => return Some(error(id, -32601, &format!("Method not found: {method}"))),
        };
        Some(json!({"jsonrpc": "2.0", "id": id, "result": result}))
    }

    fn record(&self, line: Value) {
        let Some(file) = &self.record else { return };
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
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
        {"name": "crash", "description": "Exits mid-call.", "inputSchema": none},
        {
            "name": "slow",
            "description": "Answers after a while.",
            "inputSchema": {"type": "object", "properties": {"ms": {"type": "integer", "minimum": 0}}, "required": ["ms"]}
        }
    ])
}

fn call(name: &str, arguments: &Value, auth: Option<&str>) -> Value {
    let text =
        |text: String| json!({"content": [{"type": "text", "text": text}], "isError": false});
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
        "crash" => std::process::exit(3),
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
