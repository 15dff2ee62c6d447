//! Secrets stay server-side: provider keys (a configured provider's
//! variable and key file, a spec's own `api_key_env`), HTTP tool headers
//! and a key in a tool's URL, MCP server secrets, the webhook secret, the
//! database's and NATS's passwords. Runs go through successes and failures
//! (a provider's 401 and 500 quoting the key it got, a tool's 500 quoting
//! its request, a tool timeout, a redirect to another origin) with
//! `KEEL_LOG=debug`; then no secret is in the log, a journal, an SSE
//! stream, an API answer, the CLI's output, what the model was sent, a
//! callback or webhook body, the exported events, or what another origin
//! got through the redirect. (MCP redaction at `info`: mcp.rs.)

use std::time::Duration;

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

const FIXTURE: &str = env!("CARGO_BIN_EXE_keel-mcp-fixture");

const PROVIDER_ENV: &str = "ksec-provider-env-91c0d3";
const PROVIDER_FILE: &str = "ksec-provider-file-4be1a7";
const AGENT_ENV: &str = "ksec-agent-env-7d2f05";
const TOOL_BEARER: &str = "ksec-tool-bearer-c83e21";
const TOOL_XKEY: &str = "ksec-tool-xkey-55a1b9";
/// Read into a tool's URL (`?api_key=${VAR}`) at call time.
const TOOL_QUERY: &str = "ksec-tool-query-0f9d46";
const MCP_FILE: &str = "ksec-mcp-file-3c6d88";
const MCP_HEADER: &str = "ksec-mcp-header-e27b40";
const WEBHOOK: &str = "ksec-webhook-6a7e3f";
const DB_PASSWORD: &str = "ksec-db-password-80a4c1";
const DB_LISTEN_PASSWORD: &str = "ksec-db-listen-5e19b2";

/// Every secret of the SQLite test: all live only in Keel's environment
/// and files.
const SECRETS: [&str; 9] = [
    PROVIDER_ENV,
    PROVIDER_FILE,
    AGENT_ENV,
    TOOL_BEARER,
    TOOL_XKEY,
    TOOL_QUERY,
    MCP_FILE,
    MCP_HEADER,
    WEBHOOK,
];

/// Fails when `text` (found at `place`) holds one of `secrets`, showing
/// where.
fn assert_clean(place: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        if let Some(at) = text.find(secret) {
            let mut start = at.saturating_sub(300);
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let mut end = (at + secret.len() + 300).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            panic!("{place} holds the secret {secret}: …{}…", &text[start..end]);
        }
    }
}

fn write(dir: &TempDir, name: &str, text: &str) -> String {
    let path = dir.0.join(name);
    std::fs::write(&path, text).expect("write");
    path.to_string_lossy().into_owned()
}

/// An agent whose `model` section is `model` and whose one HTTP tool POSTs
/// to `tool_url` with the two secret headers; `extra`: more top-level keys.
fn agent(name: &str, model: &str, tool_url: &str, extra: &str) -> String {
    format!(
        r#"
name: {name}
version: 1
model: {model}
system: You are a test agent.
retry: {{max_attempts: 2, backoff: {{initial: 20ms, max: 50ms}}}}
tools:
  - name: lookup
    description: Looks something up.
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    http:
      url: "{tool_url}"
      method: POST
      timeout: 500ms
      headers: {{Authorization: "Bearer ${{KEEL_TEST_SECRET_BEARER}}", X-Api-Key: "${{KEEL_TEST_SECRET_XKEY}}"}}
      retry: {{max_attempts: 2, backoff: {{initial: 20ms, max: 50ms}}}}
{extra}
"#
    )
}

/// An agent calling the one allowed tool `tool` of MCP server `server`.
fn mcp_agent(name: &str, server: &str, tool: &str) -> String {
    format!(
        "name: {name}\nversion: 1\nmodel: {{provider: mockai, model: 'tools:1'}}\ntools: [{{mcp: {server}, allow: [{tool}]}}]\n"
    )
}

async fn submit_with_callback(
    http: &reqwest::Client,
    server: &Server,
    agent: &str,
    callback: &str,
) -> String {
    let body = json!({"agent": agent, "input": "go", "callback_url": callback});
    submit_to(http, server.url("/v1/runs"), &body).await
}

/// The text of a GET answer, whatever its status.
async fn get_text(http: &reqwest::Client, url: &str) -> String {
    let r = http.get(url).send().await.expect("get");
    r.text().await.expect("text")
}

/// A run's SSE stream to its end, as text.
async fn stream_text(http: &reqwest::Client, server: &Server, id: &str) -> String {
    sse(http, &server.url(&format!("/v1/runs/{id}/events")), None)
        .await
        .iter()
        .map(|(id, name, data)| format!("{id} {name} {data}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Percent-encodes a query parameter value.
fn encode(text: &str) -> String {
    let mut url = reqwest::Url::parse("http://x/").expect("url");
    url.query_pairs_mut().append_pair("v", text);
    url.query().unwrap_or_default()[2..].to_string()
}

#[tokio::test]
async fn secrets_stay_out_of_logs_journals_answers_prompts_and_callbacks() {
    let mock = Mock::start().await.expect("mock");
    mock.counters.track_bodies();
    let dir = TempDir::new();
    let key_file = write(&dir, "provider.key", &format!("{PROVIDER_FILE}\n"));
    let mcp_file = write(&dir, "mcp.token", MCP_FILE);
    let record = dir.0.join("stdio.jsonl");
    let (fixture, mcp_url) = crate::mcp::http_fixture(&dir.0.join("http.jsonl"), false).await;
    let _fixture = crate::mcp::Killed(fixture);
    let llm = mock.llm_url();
    let config = write(
        &dir,
        "keel.yaml",
        &format!(
            r#"
providers:
  mockai: {{kind: openai, base_url: "{llm}", api_key_env: KEEL_TEST_SECRET_PROVIDER}}
  filed: {{kind: anthropic, base_url: "{llm}", api_key_file: "{key_file}"}}
mcp_servers:
  fx:
    stdio: {{command: "{FIXTURE}", args: [--record, "{record}"], env: {{FIXTURE_TOKEN: "${{file:{mcp_file}}}"}}}}
    timeout: 10s
  remote:
    http: {{url: "{mcp_url}", headers: {{Authorization: "Bearer ${{KEEL_TEST_SECRET_MCP}}"}}}}
    timeout: 10s
"#,
            record = record.display()
        ),
    );
    let server = Server::start_with_env(
        &dir.db(),
        &["--config", &config],
        &[
            ("KEEL_LOG", "debug"),
            ("KEEL_TEST_SECRET_PROVIDER", PROVIDER_ENV),
            ("KEEL_TEST_SECRET_AGENT", AGENT_ENV),
            ("KEEL_TEST_SECRET_BEARER", TOOL_BEARER),
            ("KEEL_TEST_SECRET_XKEY", TOOL_XKEY),
            ("KEEL_TEST_SECRET_MCP", MCP_HEADER),
            ("KEEL_TEST_SECRET_QUERY", TOOL_QUERY),
            ("KEEL_WEBHOOK_SECRET", WEBHOOK),
        ],
    )
    .await;
    let http = reqwest::Client::new();

    let tool = |path: &str| format!("{}{path}", mock.tool_url(""));
    let mockai = "{provider: mockai, model: 'tools:1'}";
    let filed = "{provider: filed, model: 'tools:1'}";
    let own_key = |model: &str| {
        format!(
            "{{provider: openai, model: '{model}', base_url: '{llm}', api_key_env: KEEL_TEST_SECRET_AGENT}}"
        )
    };
    // Another origin (`localhost`, not `127.0.0.1`) the redirect sends the call to.
    let elsewhere = format!(
        "http://localhost:{}/tools/mirror?via=redirect",
        mock.addr.port()
    );
    let gated = format!(
        "approvals: {{tools: [lookup], notify: '{}'}}",
        mock.hook_url("approve")
    );
    let agents = [
        // The tool answers with the request it got: headers and URL.
        agent(
            "sec-mirror",
            mockai,
            &tool("mirror?api_key=${KEEL_TEST_SECRET_QUERY}"),
            &gated,
        ),
        // The tool fails (500) quoting its request, on both attempts.
        agent(
            "sec-tool-500",
            filed,
            &tool("mirror?status=500&api_key=${KEEL_TEST_SECRET_QUERY}"),
            "",
        ),
        // The first attempt times out, the second answers.
        agent(
            "sec-timeout",
            &own_key("tools:1"),
            &tool("hang?api_key=${KEEL_TEST_SECRET_QUERY}"),
            "",
        ),
        // The tool redirects the call to another origin.
        agent(
            "sec-redirect",
            mockai,
            &tool(&format!(
                "redirect?api_key=${{KEEL_TEST_SECRET_QUERY}}&to={}",
                encode(&elsewhere)
            )),
            "",
        ),
        // Providers refusing the key, quoting it: 401 (permanent) and 500 (transient).
        agent(
            "sec-401",
            "{provider: mockai, model: 'refuse:401'}",
            &tool("echo"),
            "",
        ),
        agent("sec-401-own", &own_key("refuse:401"), &tool("echo"), ""),
        agent(
            "sec-500",
            "{provider: filed, model: 'refuse:500'}",
            &tool("echo"),
            "",
        ),
        mcp_agent("sec-mcp-stdio", "fx", "secret"),
        mcp_agent("sec-mcp-http", "remote", "secret"),
    ];
    for yaml in &agents {
        register(&http, &server, yaml).await;
    }
    let callback = mock.hook_url("cb");
    let mut runs = Vec::new();
    for name in [
        "sec-mirror",
        "sec-tool-500",
        "sec-timeout",
        "sec-redirect",
        "sec-401",
        "sec-401-own",
        "sec-500",
        "sec-mcp-stdio",
        "sec-mcp-http",
    ] {
        runs.push((
            name,
            submit_with_callback(&http, &server, name, &callback).await,
        ));
    }
    let id = |name: &str| {
        runs.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, id)| id.clone())
            .unwrap_or_default()
    };

    // The gated call waits for a decision (its webhook is signed with the secret).
    let mirror = id("sec-mirror");
    let parked = wait_for(&http, &server, &mirror, "an approval", |run| {
        run["status"] == "AWAITING_APPROVAL"
    })
    .await;
    let approval = parked["approvals"][0]["id"].as_str().expect("approval id");
    let (status, body) = decide(
        &http,
        &server,
        &mirror,
        approval,
        json!({"decision": "approve", "by": "test"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // The refused ones end in the dead-letter queue; cancelling ends their streams.
    for name in ["sec-401", "sec-401-own", "sec-500"] {
        let run = id(name);
        let view = wait_for(&http, &server, &run, "a dead letter", |r| {
            !r["dead_letter"].is_null()
        })
        .await;
        // The provider quoted the key it got: it reads redacted.
        let error = view["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("refused") && error.contains("[redacted]"),
            "{name}: {view}"
        );
        let r = http
            .post(server.url(&format!("/v1/runs/{run}/cancel")))
            .send()
            .await
            .expect("cancel");
        assert!(r.status().is_success(), "{name}: {}", r.status());
    }
    let mut views = Vec::new();
    for (name, run) in &runs {
        let view = wait_terminal(&http, &server, run, Duration::from_secs(30)).await;
        views.push((*name, view));
    }
    let view = |name: &str| {
        views
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let result = |name: &str| view(name)["steps"][0]["tool_calls"][0]["result"].clone();

    // The runs did what they were meant to: the secrets reached the tools and
    // came back redacted.
    assert_eq!(view("sec-mirror")["status"], "COMPLETED");
    let echoed: Value =
        serde_json::from_str(result("sec-mirror").as_str().unwrap_or_default()).expect("echo");
    assert_eq!(echoed["headers"]["authorization"], "Bearer [redacted]");
    assert_eq!(echoed["headers"]["x-api-key"], "[redacted]");
    assert_eq!(echoed["uri"], "/tools/mirror?api_key=[redacted]");
    let failed = result("sec-tool-500");
    assert!(
        failed.as_str().unwrap_or_default().contains("HTTP 500"),
        "{failed}"
    );
    assert!(
        result("sec-timeout")
            .as_str()
            .unwrap_or_default()
            .contains("repeated"),
        "{}",
        view("sec-timeout")
    );
    let mcp = [
        ("sec-mcp-stdio", "token=[redacted] authorization=none"),
        (
            "sec-mcp-http",
            "token=unset authorization=Bearer [redacted]",
        ),
    ];
    for (name, expected) in mcp {
        assert_eq!(result(name), expected, "{}", view(name));
    }
    // The call reached the other origin, without the secrets.
    let mirrored = mock.counters.mirrored();
    let redirected: Vec<&String> = mirrored
        .iter()
        .filter(|m| m.contains("via=redirect"))
        .collect();
    assert!(!redirected.is_empty(), "{mirrored:?}");
    for request in &redirected {
        assert_clean(
            "the request redirected to another origin",
            request,
            &SECRETS,
        );
    }
    assert!(
        mirrored.iter().any(|m| m.contains(TOOL_BEARER)),
        "the tool got its secret header: {mirrored:?}"
    );
    assert!(
        mirrored.iter().any(|m| m.contains(TOOL_QUERY)),
        "the tool got the secret of its URL: {mirrored:?}"
    );

    // Nothing of it anywhere else.
    for (name, run) in &runs {
        let text = get_text(&http, &server.url(&format!("/v1/runs/{run}"))).await;
        assert_clean(&format!("the view of {name}"), &text, &SECRETS);
        let stream = stream_text(&http, &server, run).await;
        assert_clean(&format!("the journal of {name}"), &stream, &SECRETS);
        // (Their status is that of the run: a cancelled one fails.)
        for command in ["status", "watch"] {
            let (_, out, err) = keel(&[command, run, "--server", &server.url]);
            assert!(out.contains(run.as_str()), "keel {command}: {out}{err}");
            assert_clean(
                &format!("keel {command} of {name}"),
                &format!("{out}{err}"),
                &SECRETS,
            );
        }
        let (_, out, err) = keel(&["status", run, "--json", "--server", &server.url]);
        assert_clean(
            &format!("keel status --json of {name}"),
            &format!("{out}{err}"),
            &SECRETS,
        );
    }
    for path in [
        "/v1/runs?limit=100",
        "/v1/approvals",
        "/v1/usage",
        "/v1/agents/sec-mirror/usage",
        "/v1/providers",
        "/v1/dlq",
        "/v1/runs/not-a-run",
        "/v1/dlq/not-a-letter/retry",
    ] {
        let text = get_text(&http, &server.url(path)).await;
        assert_clean(path, &text, &SECRETS);
    }
    // The specs are shown as written: no variable's value is in them.
    for path in ["/v1/agents", "/v1/agents/sec-mirror"] {
        let text = get_text(&http, &server.url(path)).await;
        assert_clean(path, &text, &SECRETS);
    }
    for args in [&["runs"][..], &["dlq"], &["agents", "list"], &["usage"]] {
        let mut args = args.to_vec();
        args.extend(["--server", &server.url]);
        let (_, out, err) = keel(&args);
        assert_clean(&format!("keel {args:?}"), &format!("{out}{err}"), &SECRETS);
    }
    let prompts = mock.counters.llm_bodies();
    assert!(prompts.len() >= 12, "{}", prompts.len());
    for prompt in &prompts {
        assert_clean("a request to the model", prompt, &SECRETS);
    }
    let hooks = mock.counters.hooks();
    assert!(hooks.iter().any(|h| h.name == "approve"), "{hooks:?}");
    assert!(hooks.iter().filter(|h| h.name == "cb").count() >= runs.len());
    for hook in &hooks {
        let seen = format!("{hook:?}");
        assert_clean(&format!("webhook {}", hook.name), &seen, &SECRETS);
        assert!(hook.signature.is_some(), "{hook:?}");
    }
    let log = std::fs::read_to_string(&server.log).expect("log");
    assert!(log.contains("DEBUG"), "not a debug log");
    assert_clean("the log", &log, &SECRETS);
}

/// A PostgreSQL URL of `db` with `password` in its user info.
fn with_password(url: &str, password: &str) -> String {
    let mut url = reqwest::Url::parse(url).expect("database URL");
    url.set_password(Some(password)).expect("password");
    url.to_string()
}

#[tokio::test]
async fn database_passwords_stay_out_of_the_log_and_the_cli() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    // The local server trusts its clients: a password is accepted and ignored.
    let url = with_password(&db.url, DB_PASSWORD);
    let mut listen = reqwest::Url::parse(&db.url).expect("database URL");
    listen
        .query_pairs_mut()
        .append_pair("password", DB_LISTEN_PASSWORD);
    let listen = listen.to_string();
    let secrets = [DB_PASSWORD, DB_LISTEN_PASSWORD];

    let (ok, out, err) = keel(&["migrate", "--database-url", &url]);
    assert!(ok, "{err}");
    assert_clean("keel migrate", &format!("{out}{err}"), &secrets);
    let (_, out, err) = keel(&["events", "status", "--database-url", &url]);
    assert_clean("keel events status", &format!("{out}{err}"), &secrets);
    // Unreachable, and a URL that cannot be read: the errors show no password.
    let nowhere = with_password("postgres://keel@127.0.0.1:1/keel", DB_PASSWORD);
    let unreadable = format!("postgres://keel:{DB_PASSWORD}@127.0.0.1:5432/keel?sslmode=nonsense");
    let slash = format!("postgres://keel:{DB_PASSWORD}/x@127.0.0.1:5432/keel");
    for bad in [&nowhere, &unreadable, &slash] {
        let (ok, out, err) = keel(&["migrate", "--database-url", bad]);
        assert!(!ok, "{out}");
        assert_clean("a failed keel migrate", &format!("{out}{err}"), &secrets);
    }

    let dir = TempDir::new();
    let mock = Mock::start().await.expect("mock");
    let server = Server::start_with_env(
        &dir.db(),
        &["--database-url", &url, "--database-listen-url", &listen],
        &[("KEEL_LOG", "debug")],
    )
    .await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("pg-secret", &mock, "tools:1", "echo", ""),
    )
    .await;
    let id = submit(&http, &server, "pg-secret", "go").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let stream = stream_text(&http, &server, &id).await;
    assert_clean("the journal", &stream, &secrets);
    let log = std::fs::read_to_string(&server.log).expect("log");
    assert!(log.contains("keel serving"), "{log}");
    assert_clean("the log", &log, &secrets);
}

/// A NATS server (JetStream on) of the test's own on a free port, requiring
/// user `keel` and `password`, when `nats-server` is installed: the process,
/// a JetStream context on it and its `host:port`.
#[cfg(feature = "nats")]
async fn own_nats(
    dir: &TempDir,
    password: &str,
) -> Option<(crate::mcp::Killed, async_nats::jetstream::Context, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .ok()?
        .port();
    let child = std::process::Command::new("nats-server")
        .args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-js",
            "--user",
            "keel",
        ])
        .args(["--pass", password, "-sd"])
        .arg(dir.0.join("jetstream"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    use std::time::Instant;
    let own = crate::mcp::Killed(child);
    let authority = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let connected = async_nats::ConnectOptions::with_user_and_password(
            "keel".to_string(),
            password.to_string(),
        )
        .connect(authority.as_str())
        .await;
        if let Ok(client) = connected {
            return Some((own, async_nats::jetstream::new(client), authority));
        }
        assert!(Instant::now() < deadline, "nats-server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(feature = "nats")]
#[tokio::test]
async fn nats_credentials_stay_out_of_the_log_and_the_exported_events() {
    use crate::nats::{jetstream, read_stream, unique_names};
    use std::time::Instant;
    const NATS_PASSWORD: &str = "ksec-nats-password-19fe7c";
    const NATS_TOKEN: &str = "ksec-nats-token-a04d3e";
    let secrets = [NATS_PASSWORD, NATS_TOKEN];
    let dir = TempDir::new();
    // A server of the test's own requiring the password, when nats-server
    // is installed: the credentials must reach it. Else the shared server,
    // which ignores them (then ingest gives a token).
    let (_own, js, authority, ingest_user) = match own_nats(&dir, NATS_PASSWORD).await {
        Some((own, js, authority)) => (Some(own), js, authority, format!("keel:{NATS_PASSWORD}")),
        None => {
            let Some((url, js)) = jetstream("nats_credentials").await else {
                return;
            };
            let authority = url
                .split_once("://")
                .map_or(url.as_str(), |(_, a)| a)
                .to_string();
            (None, js, authority, NATS_TOKEN.to_string())
        }
    };
    let events = format!("nats://keel:{NATS_PASSWORD}@{authority}");
    let ingest = format!("nats://{ingest_user}@{authority}");

    // A server list that cannot be read: the error shows no credentials.
    let db = dir.0.join("refused.db");
    let (ok, out, err) = keel(&[
        "serve",
        "--db",
        &db.to_string_lossy(),
        "--events",
        &format!("nats://keel:{NATS_PASSWORD}@{authority},bogus://x:{NATS_TOKEN}@y"),
    ]);
    assert!(!ok, "{out}");
    assert_clean(
        "keel serve with a bad NATS URL",
        &format!("{out}{err}"),
        &secrets,
    );

    let names = unique_names();
    let mock = Mock::start().await.expect("mock");
    let server = Server::start_with_env(
        &dir.db(),
        &[
            "--events",
            &events,
            "--ingest",
            &ingest,
            "--nats-prefix",
            names.prefix(),
        ],
        &[("KEEL_LOG", "debug")],
    )
    .await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("nats-secret", &mock, "tools:1", "echo", ""),
    )
    .await;
    let id = submit(&http, &server, "nats-secret", "go").await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    // Every event is exported (the relay connected with the credentials).
    let deadline = Instant::now() + Duration::from_secs(30);
    let exported = loop {
        let exported = read_stream(&js, &names.events_stream()).await;
        if exported.len() >= 6 {
            break exported;
        }
        assert!(Instant::now() < deadline, "{} exported", exported.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for message in &exported {
        let text = String::from_utf8_lossy(&message.payload);
        assert_clean("an exported event", &text, &secrets);
    }
    let log = std::fs::read_to_string(&server.log).expect("log");
    assert!(log.contains("ingest connected"), "{log}");
    assert_clean("the log", &log, &secrets);
    for stream in [
        names.events_stream(),
        names.ingest_stream(),
        names.dead_stream(),
    ] {
        let _ = js.delete_stream(&stream).await;
    }
}

#[test]
fn options_holding_secrets_do_not_show_them() {
    let options = keel_engine::Options {
        webhook_secret: Some(WEBHOOK.to_string()),
        ..keel_engine::Options::default()
    };
    assert_clean("engine options", &format!("{options:?}"), &[WEBHOOK]);
    let url = format!("postgres://keel:{DB_PASSWORD}@db/keel");
    let mut store = keel_store::postgres::Options::new(url);
    store.listen_url = Some(format!("postgres://db/keel?password={DB_LISTEN_PASSWORD}"));
    assert_clean(
        "store options",
        &format!("{store:?}"),
        &[DB_PASSWORD, DB_LISTEN_PASSWORD],
    );
    #[cfg(feature = "nats")]
    {
        let servers = keel::nats::Servers::new("nats://keel:pw-1234@a:4222, nats://tok-5678@b");
        assert_eq!(servers.to_string(), "nats://keel:***@a:4222,nats://***@b");
        assert_eq!(
            format!("{servers:?}"),
            "Servers(nats://keel:***@a:4222,nats://***@b)"
        );
    }
}
