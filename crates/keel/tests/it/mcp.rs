//! MCP servers end to end: `keel serve` with the fixture server over stdio
//! (spawned and supervised by Keel) and over streamable HTTP; discovery,
//! allow lists, schema checks, `_meta`, secrets, calls cut by a dying
//! server, tool list changes, restarts, shutdown, a SIGKILLed keel.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

const FIXTURE: &str = env!("CARGO_BIN_EXE_keel-mcp-fixture");

/// The lines the fixture recorded.
fn recorded(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("record line"))
        .collect()
}

/// The tool calls the fixture received, in order.
fn calls(path: &Path) -> Vec<Value> {
    recorded(path)
        .into_iter()
        .filter(|l| l.get("tool").is_some())
        .collect()
}

/// The call of `tool` among those received.
fn called<'a>(received: &'a [Value], tool: &str) -> &'a Value {
    received
        .iter()
        .find(|c| c["tool"] == tool)
        .unwrap_or_else(|| panic!("no call of {tool}: {received:?}"))
}

/// A run's journal: every event of its SSE stream, and the raw text.
async fn journal(http: &reqwest::Client, server: &Server, id: &str) -> (Vec<Value>, String) {
    let events = sse(http, &server.url(&format!("/v1/runs/{id}/events")), None).await;
    let data: Vec<Value> = events
        .into_iter()
        .map(|(_, _, data)| data["event"].clone())
        .collect();
    let text = data
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n");
    (data, text)
}

/// The events of `kind` (`tool_call_completed`, …) by call index.
fn by_call(events: &[Value], kind: &str) -> Vec<(u64, Value)> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .map(|e| (e["call_index"].as_u64().expect("call_index"), e.clone()))
        .collect()
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.0.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_string_lossy().into_owned()
}

/// A configuration with the stdio fixture as server `fx`, recording to
/// `record`, with more `args` (`, --flag`) and server keys (`extra`, YAML
/// lines).
fn fixture_config(dir: &TempDir, record: &Path, args: &str, extra: &str) -> String {
    write(
        dir,
        "keel.yaml",
        &format!(
            "mcp_servers:\n  fx:\n    stdio: {{command: '{FIXTURE}', args: [--record, '{}'{args}]}}\n    timeout: 10s\n{extra}",
            record.display()
        ),
    )
}

fn is_traceparent_of(value: &Value, run_id: &str) -> bool {
    let trace = value.as_str().unwrap_or_default();
    let run: uuid::Uuid = run_id.parse().expect("run id");
    keel::mock::is_traceparent(trace) && trace.split('-').nth(1) == Some(&run.simple().to_string())
}

#[tokio::test]
async fn stdio_tools_are_discovered_allowed_validated_and_keep_their_secrets() {
    let dir = TempDir::new();
    let secret = "s3cret-stdio-token-42";
    let token_file = write(&dir, "token", &format!("{secret}\n"));
    let record = dir.0.join("record.jsonl");
    let config = write(
        &dir,
        "keel.yaml",
        &format!(
            r#"
mcp_servers:
  fx:
    stdio:
      command: "{FIXTURE}"
      args: [--record, "{record}"]
      env: {{FIXTURE_TOKEN: "${{file:{token_file}}}", MODE: test}}
    timeout: 10s
"#,
            record = record.display()
        ),
    );
    let server = Server::start(&dir.db(), &["--config", &config]).await;
    let http = reqwest::Client::new();

    // A spec naming a server the configuration lacks is refused at registration.
    let r = http
        .post(server.url("/v1/agents"))
        .header("content-type", "application/yaml")
        .body("name: x\nversion: 1\nmodel: {provider: scripted, model: s, script: [{content: hi}]}\ntools: [{mcp: github, allow: ['*']}]\n")
        .send()
        .await
        .expect("register");
    assert_eq!(r.status(), 422);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("tools[0].mcp") && body.contains("fx"),
        "{body}"
    );

    register(
        &http,
        &server,
        r#"
name: mcp-agent
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls:
        - {name: fx__echo, arguments: {text: hello}}
        - {name: fx__add, arguments: {a: 2, b: 3}}
        - {name: fx__create_issue, arguments: {title: not allowed}}
        - {name: create_issue, arguments: {title: bare name}}
        - {name: fx__add, arguments: {a: two, b: 3}}
        - {name: fx__secret}
        - {name: fx__env}
        - {name: fx__fail}
    - content: "done: {{tool_result}}"
tools:
  - {mcp: fx, allow: [echo, add, secret, env, fail]}
"#,
    )
    .await;
    let id = submit(&http, &server, "mcp-agent", "go").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");

    let (events, text) = journal(&http, &server, &id).await;
    let completed = by_call(&events, "tool_call_completed");
    let output = |i: u64| {
        let (_, e) = completed
            .iter()
            .find(|(c, _)| *c == i)
            .unwrap_or_else(|| panic!("call {i} did not complete: {events:?}"));
        (
            e["output"].as_str().unwrap_or_default().to_string(),
            e["is_error"] == true,
        )
    };
    assert_eq!(output(0), ("hello".to_string(), false));
    assert_eq!(output(1), ("5".to_string(), false));
    // The server's secret reached it (its environment) and was redacted on the way back.
    assert_eq!(
        output(5),
        ("token=[redacted] authorization=none".to_string(), false)
    );
    // Its environment holds only what the configuration gives it.
    assert_eq!(output(6), ("FIXTURE_TOKEN,MODE".to_string(), false));
    assert_eq!(
        output(7),
        ("the fixture failed on purpose".to_string(), true)
    );

    // Not allowed (prefixed or not) and invalid arguments: refused before any call.
    let rejected = by_call(&events, "tool_call_rejected");
    let indexes: Vec<u64> = rejected.iter().map(|(i, _)| *i).collect();
    assert_eq!(indexes, [2, 3, 4], "{rejected:?}");
    let error = |i: usize| {
        rejected[i].1["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        error(0).starts_with("unknown tool `fx__create_issue`"),
        "{}",
        error(0)
    );
    assert!(!error(0).contains("fx__create_issue,"), "{}", error(0));
    assert!(
        error(1).starts_with("unknown tool `create_issue`"),
        "{}",
        error(1)
    );
    assert!(error(2).contains("do not match its schema"), "{}", error(2));

    // What the server received: only the allowed, valid calls, each with
    // the call's idempotency key and the run's traceparent in `_meta`.
    let received = calls(&record);
    let mut names: Vec<&str> = received
        .iter()
        .map(|c| c["tool"].as_str().unwrap_or(""))
        .collect();
    names.sort();
    assert_eq!(names, ["add", "echo", "env", "fail", "secret"]);
    let echo = called(&received, "echo");
    assert_eq!(echo["arguments"], json!({"text": "hello"}));
    assert_eq!(echo["meta"]["keel/idempotency_key"], format!("{id}:1:0"));
    assert!(
        is_traceparent_of(&echo["meta"]["traceparent"], &id),
        "{echo}"
    );
    let add = called(&received, "add");
    assert_eq!(add["meta"]["keel/idempotency_key"], format!("{id}:1:1"));
    let handshakes: Vec<Value> = recorded(&record)
        .into_iter()
        .filter_map(|l| l.get("handshake").cloned())
        .collect();
    assert_eq!(handshakes, [json!("server/discover")]);

    // The model is offered exactly the allowed tools, with the server's schemas.
    let mock = Mock::start().await.expect("mock");
    mock.counters.track_tools();
    register(
        &http,
        &server,
        &format!(
            "name: offered\nversion: 1\nmodel: {{provider: openai, model: 'long:1:0', base_url: '{}'}}\ntools: [{{mcp: fx, allow: [echo, 'a*']}}]\n",
            mock.llm_url()
        ),
    )
    .await;
    let offered = submit(&http, &server, "offered", "hi").await;
    let run = wait_terminal(&http, &server, &offered, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(mock.counters.offered_tools(), ["fx__echo", "fx__add"]);

    // The secret is in no journal and no log line; the server's stderr is logged, redacted.
    assert!(!text.contains(secret));
    let log = std::fs::read_to_string(&server.log).expect("log");
    assert!(!log.contains(secret), "the secret leaked into the log");
    assert!(log.contains("ready (token [redacted])"), "{log}");
}

/// Starts the fixture over HTTP on a free port; returns it and its endpoint.
pub(crate) async fn http_fixture(record: &Path, legacy: bool) -> (Child, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut command = Command::new(FIXTURE);
    command
        .args(["--http", &format!("127.0.0.1:{port}"), "--record"])
        .arg(record)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if legacy {
        command.arg("--legacy");
    }
    let child = command.spawn().expect("spawn the fixture");
    let url = format!("http://127.0.0.1:{port}/mcp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the HTTP fixture did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, url)
}

pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn http_tools_work_over_both_handshakes() {
    for legacy in [true, false] {
        let dir = TempDir::new();
        let record = dir.0.join("record.jsonl");
        let (fixture, url) = http_fixture(&record, legacy).await;
        let _fixture = Killed(fixture);
        let secret = "Bearer s3cret-http-token-7";
        let config = write(
            &dir,
            "keel.yaml",
            &format!(
                "mcp_servers:\n  remote:\n    http:\n      url: {url}\n      headers: {{Authorization: '${{KEEL_TEST_MCP_AUTH}}'}}\n    timeout: 10s\n"
            ),
        );
        let server = Server::start_with_env(
            &dir.db(),
            &["--config", &config],
            &[("KEEL_TEST_MCP_AUTH", secret)],
        )
        .await;
        let http = reqwest::Client::new();
        register(
            &http,
            &server,
            r#"
name: remote-agent
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls:
        - {name: remote__echo, arguments: {text: over http}}
        - {name: remote__add, arguments: {a: 1}}
        - {name: remote__create_issue, arguments: {title: t}}
        - {name: remote__secret}
    - content: "done: {{tool_result}}"
tools:
  - {mcp: remote, allow: [echo, add, secret]}
"#,
        )
        .await;
        let id = submit(&http, &server, "remote-agent", "go").await;
        let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "COMPLETED", "legacy {legacy}: {run}");
        let (events, text) = journal(&http, &server, &id).await;
        let completed = by_call(&events, "tool_call_completed");
        let outputs: Vec<(u64, &str)> = completed
            .iter()
            .map(|(i, e)| (*i, e["output"].as_str().unwrap_or_default()))
            .collect();
        assert!(outputs.contains(&(0, "over http")), "{outputs:?}");
        assert!(
            outputs.contains(&(3, "token=unset authorization=[redacted]")),
            "{outputs:?}"
        );
        let rejected: Vec<u64> = by_call(&events, "tool_call_rejected")
            .iter()
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(rejected, [1, 2]);

        let received = calls(&record);
        let mut names: Vec<&str> = received
            .iter()
            .map(|c| c["tool"].as_str().unwrap_or(""))
            .collect();
        names.sort();
        assert_eq!(names, ["echo", "secret"]);
        let echo = called(&received, "echo");
        assert_eq!(echo["meta"]["keel/idempotency_key"], format!("{id}:1:0"));
        assert!(
            is_traceparent_of(&echo["meta"]["traceparent"], &id),
            "{echo}"
        );
        let handshake = if legacy {
            "initialize"
        } else {
            "server/discover"
        };
        let handshakes: Vec<Value> = recorded(&record)
            .into_iter()
            .filter_map(|l| l.get("handshake").cloned())
            .collect();
        assert_eq!(handshakes, [json!(handshake)], "legacy {legacy}");

        assert!(!text.contains("s3cret-http-token-7"));
        let log = std::fs::read_to_string(&server.log).expect("log");
        assert!(!log.contains("s3cret-http-token-7"));
    }
}

/// Whether a process runs (a zombie counts as gone).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// The pids of the fixture processes that started, in order.
fn started(record: &Path) -> Vec<u64> {
    recorded(record)
        .iter()
        .filter_map(|l| l["started"].as_u64())
        .collect()
}

/// The idempotency keys of the calls of `tool` the fixture received.
fn keys_of(record: &Path, tool: &str) -> Vec<String> {
    calls(record)
        .iter()
        .filter(|c| c["tool"] == tool)
        .map(|c| {
            c["meta"]["keel/idempotency_key"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn a_call_cut_by_a_dying_stdio_server_is_uncertain() {
    let dir = TempDir::new();
    let record = dir.0.join("record.jsonl");
    let config = fixture_config(&dir, &record, "", "");
    let mut server = Server::start(&dir.db(), &["--config", &config]).await;
    let http = reqwest::Client::new();
    // `crash` exits mid-call the first time for a key, and answers after.
    let agent = |name: &str, policy: &str| {
        format!(
            r#"
name: {name}
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls: [{{name: fx__crash}}]
    - tool_calls: [{{name: fx__echo, arguments: {{text: back again}}}}]
    - content: "done: {{{{tool_result}}}}"
tools:
  - {{mcp: fx, allow: ["*"]{policy}}}
"#
        )
    };
    register(&http, &server, &agent("idempotent", ", idempotent: true")).await;
    register(&http, &server, &agent("asking", "")).await;

    // Idempotent (on_uncertain: retry): no result is journaled for the
    // cut call; the task's next attempt makes it again with the same key,
    // on the respawned process.
    let id = submit(&http, &server, "idempotent", "go").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(run["output"], "done: back again", "{run}");
    let call = &run["steps"][0]["tool_calls"][0];
    assert_eq!(call["attempts"], 2, "{call}");
    let (events, _) = journal(&http, &server, &id).await;
    let results: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "tool_call_completed" && e["step"] == 1)
        .collect();
    assert_eq!(results.len(), 1, "{results:?}");
    assert_eq!(results[0]["output"], "back after a crash");
    assert_eq!(results[0]["is_error"], false);
    let starts: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "tool_call_started" && e["step"] == 1)
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    let key = format!("{id}:1:0");
    assert_eq!(keys_of(&record, "crash"), [key.clone(), key]);
    // Two processes: the one that died and its replacement.
    let pids = started(&record);
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(!alive(pids[0]));
    assert!(alive(pids[1]));

    // Not declared idempotent (on_uncertain: ask): the run parks for a
    // human; approving makes the call again with the same key.
    let id = submit(&http, &server, "asking", "go").await;
    let run = wait_for(&http, &server, &id, "parking", |r| {
        r["status"] == "AWAITING_APPROVAL"
    })
    .await;
    let approval = &run["approvals"][0];
    assert_eq!(approval["id"], "1.0.2", "{run}");
    assert_eq!(approval["reason"], "uncertain", "{run}");
    let key = format!("{id}:1:0");
    let crashes = keys_of(&record, "crash");
    assert_eq!(crashes.len(), 3, "{crashes:?}");
    assert_eq!(crashes[2], key);
    let (status, _) = decide(&http, &server, &id, "1.0.2", json!({"decision": "approve"})).await;
    assert_eq!(status, 200);
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(run["output"], "done: back again", "{run}");
    assert_eq!(keys_of(&record, "crash")[2..], [key.clone(), key]);
    let pids = started(&record);
    assert_eq!(pids.len(), 3, "{pids:?}");

    // A graceful shutdown stops the server process too.
    terminate(&mut server, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pids[2]) {
        assert!(Instant::now() < deadline, "the MCP server outlived keel");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_compensation_cut_by_a_dying_server_is_made_again_with_its_key() {
    let dir = TempDir::new();
    let record = dir.0.join("record.jsonl");
    std::fs::write(dir.0.join("order.txt"), "order 7").expect("data file");
    let config = fixture_config(&dir, &record, "", "");
    let server = Server::start(&dir.db(), &["--config", &config]).await;
    let http = reqwest::Client::new();
    // Reading the order "books" it; the run then fails at max_steps, and
    // the compensation (`crash`: the server dies mid-call the first time
    // for a key) is cut off once.
    register(
        &http,
        &server,
        &format!(
            r#"
name: undo
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls: [{{name: order, arguments: {{path: order.txt}}}}]
    - tool_calls: [{{name: order, arguments: {{path: order.txt}}}}]
limits: {{max_steps: 2}}
retry: {{max_attempts: 3, backoff: {{initial: 20ms, max: 50ms}}}}
tools:
  - name: order
    builtin: read_file
    root: "{}"
    compensate: {{tool: fx__crash, arguments: {{}}}}
  - {{mcp: fx, allow: [crash]}}
"#,
            dir.0.display()
        ),
    )
    .await;
    let id = submit(&http, &server, "undo", "go").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "FAILED", "{run}");
    let saga = &run["compensation"];
    assert_eq!(
        (saga["completed"].as_u64(), saga["failed"].as_u64()),
        (Some(1), Some(0)),
        "{saga}"
    );
    let undone = &saga["compensations"][0];
    assert_eq!(undone["attempts"], 2, "{saga}");
    assert_eq!(undone["result"], "back after a crash", "{saga}");
    let key = format!("{id}:compensate:1:0");
    assert_eq!(keys_of(&record, "crash"), [key.clone(), key]);
}

#[tokio::test]
async fn a_call_cut_by_a_dying_http_server_is_made_again() {
    let dir = TempDir::new();
    let record = dir.0.join("record.jsonl");
    let (fixture, url) = http_fixture(&record, false).await;
    let mut fixture = Killed(fixture);
    let config = write(
        &dir,
        "keel.yaml",
        &format!("mcp_servers:\n  remote:\n    http: {{url: '{url}'}}\n    timeout: 10s\n"),
    );
    let server = Server::start(&dir.db(), &["--config", &config]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        r#"
name: remote-crashy
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls: [{name: remote__crash}]
    - content: "done: {{tool_result}}"
tools:
  - {mcp: remote, allow: [crash], idempotent: true}
"#,
    )
    .await;
    let id = submit(&http, &server, "remote-crashy", "go").await;
    // The server exits mid-call, cutting the HTTP connection; it comes
    // back on the same address.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !matches!(fixture.0.try_wait(), Ok(Some(_))) {
        assert!(Instant::now() < deadline, "the HTTP fixture did not crash");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let port = url
        .trim_end_matches("/mcp")
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .expect("port");
    fixture = Killed(
        Command::new(FIXTURE)
            .args(["--http", &format!("127.0.0.1:{port}"), "--record"])
            .arg(&record)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart the fixture"),
    );
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(run["output"], "done: back after a crash", "{run}");
    assert_eq!(run["steps"][0]["tool_calls"][0]["attempts"], 2, "{run}");
    let key = format!("{id}:1:0");
    assert_eq!(keys_of(&record, "crash"), [key.clone(), key]);
    drop(fixture);
}

#[tokio::test]
async fn a_tool_added_at_runtime_is_callable_after_list_changed() {
    for legacy in [false, true] {
        let dir = TempDir::new();
        let record = dir.0.join("record.jsonl");
        let legacy_arg = if legacy { ", --legacy" } else { "" };
        // Re-listed every hour: only the notification can bring the tool in time.
        let config = fixture_config(&dir, &record, legacy_arg, "    refresh: 1h\n");
        let server = Server::start(&dir.db(), &["--config", &config]).await;
        let http = reqwest::Client::new();
        register(
            &http,
            &server,
            r#"
name: grower
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls: [{name: fx__register_tool, arguments: {name: greet}}]
    - tool_calls: [{name: fx__greet}]
    - content: "done: {{tool_result}}"
tools:
  - {mcp: fx, allow: [register_tool, greet]}
"#,
        )
        .await;
        let started = Instant::now();
        let id = submit(&http, &server, "grower", "go").await;
        let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "COMPLETED", "legacy {legacy}: {run}");
        assert_eq!(
            run["output"], "done: hello from greet",
            "legacy {legacy}: {run}"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        let (events, _) = journal(&http, &server, &id).await;
        assert!(
            by_call(&events, "tool_call_rejected").is_empty(),
            "legacy {legacy}: {events:?}"
        );

        // What the server saw: the handshake, a subscription to list
        // changes on 2026-07-28 only (older servers notify unasked), and a
        // second listing that has the new tool.
        let lines = recorded(&record);
        let handshake = if legacy {
            "initialize"
        } else {
            "server/discover"
        };
        let handshakes: Vec<&Value> = lines.iter().filter_map(|l| l.get("handshake")).collect();
        assert_eq!(handshakes, [&json!(handshake)], "legacy {legacy}");
        let listens: Vec<&Value> = lines.iter().filter_map(|l| l.get("listen")).collect();
        if legacy {
            assert!(listens.is_empty(), "{listens:?}");
        } else {
            assert_eq!(listens, [&json!({"toolsListChanged": true})]);
        }
        let listed: Vec<&Value> = lines.iter().filter_map(|l| l.get("listed")).collect();
        assert_eq!(listed.len(), 2, "legacy {legacy}: {listed:?}");
        assert!(
            !listed[0]
                .as_array()
                .expect("names")
                .contains(&json!("greet"))
        );
        assert!(
            listed[1]
                .as_array()
                .expect("names")
                .contains(&json!("greet"))
        );
    }
}

#[tokio::test]
async fn a_stdio_server_dies_with_a_sigkilled_keel() {
    let dir = TempDir::new();
    let record = dir.0.join("record.jsonl");
    // `--linger`: the server ignores its stdin closing, so only the kernel
    // (PR_SET_PDEATHSIG) can stop it once keel is gone.
    let config = fixture_config(&dir, &record, ", --linger", "");
    let mut server = Server::start(&dir.db(), &["--config", &config]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        let handshakes = recorded(&record)
            .iter()
            .filter(|l| l.get("handshake").is_some())
            .count();
        if let (1, [pid]) = (handshakes, started(&record).as_slice()) {
            break *pid;
        }
        assert!(Instant::now() < deadline, "the MCP server never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(alive(pid));

    server.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the MCP server {pid} outlived a SIGKILLed keel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_call_cut_by_sigkill_is_made_again_with_the_same_key() {
    let dir = TempDir::new();
    let record = dir.0.join("record.jsonl");
    let config = fixture_config(&dir, &record, "", "");
    let mut server = Server::start(&dir.db(), &["--config", &config]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        r#"
name: slow
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls: [{name: fx__slow, arguments: {ms: 1500}}]
    - content: "done: {{tool_result}}"
tools:
  - {mcp: fx, allow: [slow], on_uncertain: retry}
"#,
    )
    .await;
    let id = submit(&http, &server, "slow", "go").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while calls(&record).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the call never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mid-call: ToolCallStarted is journaled, the result is not.
    server.kill();

    let server = Server::start(&dir.db(), &["--config", &config]).await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(run["output"], "done: slept", "{run}");
    let call = &run["steps"][0]["tool_calls"][0];
    assert_eq!(call["attempts"], 2, "{call}");
    // The server saw the call twice, with the same idempotency key.
    let received = calls(&record);
    assert_eq!(received.len(), 2, "{received:?}");
    for call in &received {
        assert_eq!(call["meta"]["keel/idempotency_key"], format!("{id}:1:0"));
    }
}
