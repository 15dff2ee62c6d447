//! Test fixtures: a `keel serve` child process and helpers around it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::Value;

/// A fresh temp folder removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("keel-test-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn db(&self) -> PathBuf {
        self.0.join("keel.db")
    }

    /// Writes the server configuration `yaml` here (`keel.yaml`, replacing
    /// an earlier one); its path, for `--config`.
    pub fn config(&self, yaml: &str) -> String {
        let path = self.0.join("keel.yaml");
        std::fs::write(&path, yaml).expect("write the configuration");
        path.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `keel` with `args` to the end: whether it succeeded, its stdout
/// and its stderr.
pub fn keel(args: &[&str]) -> (bool, String, String) {
    keel_with_env(args, &[])
}

/// [`keel`] with more environment variables (none of the caller's
/// `KEEL_DB`, `KEEL_DATABASE_URL` or `KEEL_API_TOKEN` is passed on).
pub fn keel_with_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .env("KEEL_LOG", "warn")
        .env_remove("KEEL_DB")
        .env_remove("KEEL_DATABASE_URL")
        .env_remove("KEEL_API_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("run keel");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A `keel serve` child process, killed on drop.
pub struct Server {
    pub child: Child,
    pub url: String,
    /// Its stderr (the log).
    pub log: PathBuf,
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

impl Server {
    /// Starts `keel serve` on `db` and waits until it answers /healthz.
    pub async fn start(db: &Path, args: &[&str]) -> Server {
        Server::start_with_env(db, args, &[]).await
    }

    /// Like [`Server::start`], with more environment variables (`KEEL_LOG`
    /// among them replaces the default `info`).
    pub async fn start_with_env(db: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let log = db.with_extension(format!("{port}.log"));
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_keel"))
            .arg("serve")
            .arg("--listen")
            .arg(&listen)
            .arg("--db")
            .arg(db)
            .args(args)
            .env("KEEL_LOG", "info")
            .env_remove("KEEL_API_TOKEN")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn keel serve");
        let server = Server {
            child,
            url: format!("http://{listen}"),
            log: log.clone(),
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", server.url)).send().await
                && r.status().is_success()
            {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "keel serve did not start; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the process to end by itself (a failpoint), and says how.
    pub async fn exited(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keel serve is still running; log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent spec (YAML) using the mock model `model` and one HTTP tool
/// (idempotent: the mock tool server only counts calls, so an uncertain call
/// is retried with its key).
pub fn agent_yaml(name: &str, mock: &Mock, model: &str, tool: &str, extra: &str) -> String {
    format!(
        r#"
name: {name}
version: 1
model:
  provider: openai
  model: "{model}"
  base_url: "{llm}"
  timeout: 10s
system: You are a test agent.
tools:
  - name: {tool}
    description: A test tool.
    parameters:
      type: object
      properties:
        n: {{type: integer}}
      required: [n]
    http:
      url: "{tool_url}"
      method: POST
      timeout: 5s
      retry: {{max_attempts: 3, backoff: {{initial: 20ms, max: 100ms}}}}
    idempotent: true
{extra}
"#,
        llm = mock.llm_url(),
        tool_url = mock.tool_url(tool),
    )
}

/// An agent (`tools:1` on the mock model) whose one tool, `resize`, is
/// made by the external workers of queue `images`; `extra` is more YAML.
pub fn worker_agent(name: &str, mock: &Mock, extra: &str) -> String {
    format!(
        r#"
name: {name}
version: 1
model: {{provider: openai, model: "tools:1", base_url: "{llm}", timeout: 10s}}
system: You are a test agent.
tools:
  - name: resize
    description: Resizes an image (an external worker does it).
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    worker: images
{extra}
"#,
        llm = mock.llm_url(),
    )
}

/// The text of `GET /metrics`.
pub async fn metrics_text(http: &reqwest::Client, server: &Server) -> String {
    http.get(server.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// A client that sends `Authorization: Bearer <token>` with every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
        .expect("a token fit for a header");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("client")
}

pub async fn register(http: &reqwest::Client, server: &Server, yaml: &str) {
    let r = http
        .post(server.url("/v1/agents"))
        .header("content-type", "application/yaml")
        .body(yaml.to_string())
        .send()
        .await
        .expect("register");
    assert!(
        r.status().is_success(),
        "register failed: {}",
        r.text().await.unwrap_or_default()
    );
}

pub async fn submit(http: &reqwest::Client, server: &Server, agent: &str, input: &str) -> String {
    let body = serde_json::json!({"agent": agent, "input": input});
    submit_to(http, server.url("/v1/runs"), &body).await
}

/// POSTs a submission (`body`: the request's JSON) to `url`, expects the
/// 202 and returns the run's id.
pub async fn submit_to(http: &reqwest::Client, url: String, body: &Value) -> String {
    submit_with(http, url, body, &[]).await
}

/// [`submit_to`] with these headers (`Idempotency-Key`, `traceparent`, …).
pub async fn submit_with(
    http: &reqwest::Client,
    url: String,
    body: &Value,
    headers: &[(&str, &str)],
) -> String {
    let mut request = http.post(url).json(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let r = request.send().await.expect("submit");
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.expect("json");
    body["id"].as_str().expect("id").to_string()
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    let r = http.get(url).send().await.expect("get");
    r.json().await.expect("json")
}

/// Polls a run until `done` holds for its view (30 s at most; `what`
/// names it in the failure).
pub async fn wait_for(
    http: &reqwest::Client,
    server: &Server,
    id: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let run = get_json(http, &server.url(&format!("/v1/runs/{id}"))).await;
        if done(&run) {
            return run;
        }
        assert!(
            Instant::now() < deadline,
            "run {id}: {what} never happened: {run}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls a run until its status is terminal.
pub async fn wait_terminal(
    http: &reqwest::Client,
    server: &Server,
    id: &str,
    within: Duration,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let run = get_json(http, &server.url(&format!("/v1/runs/{id}"))).await;
        if matches!(
            run["status"].as_str(),
            Some("COMPLETED" | "FAILED" | "CANCELLED")
        ) {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} did not finish: {run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads the inbox page by page (`query` without the cursor): the pages'
/// (run id, approval id) pairs and whether each had a `next_cursor`.
pub async fn inbox_pages(
    http: &reqwest::Client,
    server: &Server,
    query: &str,
) -> Vec<(Vec<(String, String)>, bool)> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => server.url(&format!("/v1/approvals?{query}&cursor={c}")),
            None => server.url(&format!("/v1/approvals?{query}")),
        };
        let page = get_json(http, &url).await;
        let approvals: Vec<(String, String)> = page["approvals"]
            .as_array()
            .unwrap_or_else(|| panic!("no approvals: {page}"))
            .iter()
            .map(|a| {
                assert_eq!(a["status"], "pending", "{a}");
                (
                    a["run_id"].as_str().unwrap_or("").to_string(),
                    a["id"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let next = page["next_cursor"].as_str().map(str::to_string);
        pages.push((approvals, next.is_some()));
        match next {
            Some(next) => cursor = Some(next),
            None => return pages,
        }
        assert!(pages.len() < 20, "the inbox pages forever");
    }
}

/// Reads a run's SSE stream to the end: (id, event name, data) per event.
/// The database failing to answer within the server's deadline (as on a
/// loaded machine with a short `--database-timeout`) is retried as a client
/// should: a 503 after its Retry-After, an `error` event by reconnecting
/// with Last-Event-ID; a few times.
pub async fn sse(
    http: &reqwest::Client,
    url: &str,
    last_event_id: Option<i64>,
) -> Vec<(i64, String, Value)> {
    use eventsource_stream::Eventsource;
    use futures_util::StreamExt;
    let mut out = Vec::new();
    let mut last = last_event_id;
    let read = async {
        for _ in 0..6 {
            let mut request = http.get(url).header("accept", "text/event-stream");
            if let Some(id) = last {
                request = request.header("last-event-id", id.to_string());
            }
            let response = request.send().await.expect("sse");
            if response.status() == 503 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            assert_eq!(response.status(), 200);
            assert_eq!(
                response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok()),
                Some("text/event-stream")
            );
            let mut stream = response.bytes_stream().eventsource();
            let mut failed = false;
            while let Some(Ok(event)) = stream.next().await {
                if event.event == "error" {
                    failed = true;
                    break;
                }
                let data: Value = serde_json::from_str(&event.data).expect("event json");
                let id: i64 = event.id.parse().expect("numeric id");
                last = Some(id);
                out.push((id, event.event, data));
            }
            if !failed {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("the event stream of {url} kept failing");
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("sse stream did not end");
    out
}

/// A PostgreSQL database of one test's own on the server named by
/// `KEEL_TEST_DATABASE_URL` (default: the local server), dropped on drop.
/// With no server there the test is skipped (`None`), unless `CI=true`,
/// where it fails.
pub struct PgDb {
    pub url: String,
    name: String,
    server: String,
}

impl PgDb {
    pub async fn create() -> Option<PgDb> {
        use sqlx::Connection;
        let server = std::env::var("KEEL_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let connected =
            tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&server))
                .await;
        match connected {
            Ok(Ok(conn)) => {
                let _ = conn.close().await;
            }
            other => {
                let why = match other {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "PostgreSQL at {server} is unreachable in CI: {why}"
                );
                eprintln!("skipped: PostgreSQL at {server} is unreachable: {why}");
                return None;
            }
        };
        let scratch = keel_store::postgres::create_database(&server, "keel_it")
            .await
            .expect("create the test database");
        Some(PgDb {
            url: scratch.url,
            name: scratch.name,
            server,
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection to the server's maintenance database (not this one):
    /// it survives whatever is done to this database's sessions.
    pub async fn admin(&self) -> sqlx::PgConnection {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&self.server)
            .await
            .expect("connect to the server")
    }

    /// Terminates every session of this database (as a server restart, a
    /// failover or a pooler's restart does): how many, and how many of them
    /// were LISTEN sessions. `admin`: see [`PgDb::admin`].
    pub async fn terminate_sessions(&self, admin: &mut sqlx::PgConnection) -> (i64, i64) {
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)), \
                    count(*) FILTER (WHERE application_name = 'keel-listen') \
             FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_one(admin)
        .await
        .expect("terminate sessions")
    }

    /// Lets this database take new connections, or refuses them.
    pub async fn allow_connections(&self, admin: &mut sqlx::PgConnection, allow: bool) {
        let sql = format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS {allow}",
            self.name
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(admin)
            .await
            .expect("alter database");
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        // Best effort, on a thread of its own: Drop cannot await.
        let server = self.server.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            let _ = rt.block_on(keel_store::postgres::drop_database(&server, &name));
        })
        .join();
    }
}

/// Sends SIGTERM to a server and waits for it to exit; returns how long it took.
pub async fn terminate(server: &mut Server, within: Duration) -> Duration {
    let pid = server.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let stopped = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            stopped.elapsed() < within,
            "keel serve did not stop on SIGTERM within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}");
    stopped.elapsed()
}

/// Decides approval `approval` of run `id` (`body`: the decision); the
/// answer's status and JSON.
pub async fn decide(
    http: &reqwest::Client,
    server: &Server,
    id: &str,
    approval: &str,
    body: Value,
) -> (u16, Value) {
    let r = http
        .post(server.url(&format!("/v1/runs/{id}/approvals/{approval}")))
        .json(&body)
        .send()
        .await
        .expect("decide");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json"))
}

/// The answer of a parent whose model answers with its fan-in (a JSON
/// array of the children's outcomes).
pub fn fan_in(run: &Value) -> Value {
    serde_json::from_str(run["output"].as_str().expect("output")).expect("fan-in is JSON")
}

/// Checks a finished run of the mock's `tools:N` model (`tool_steps` = N)
/// after crashes: COMPLETED with its N tool steps and the answer, each
/// step's call keyed `<run>:<step>:0` with a result, made at least once
/// and no more often than its journaled starts (a repeat only for a call
/// started without a result). Returns how many calls were made more than
/// once.
pub fn check_tool_steps(
    id: &str,
    run: &Value,
    tool_steps: usize,
    calls: &std::collections::HashMap<String, u32>,
) -> usize {
    assert_eq!(run["status"], "COMPLETED", "{run}");
    assert_eq!(run["step_count"], tool_steps + 1, "{run}");
    let steps = run["steps"].as_array().expect("steps");
    let mut repeated = 0;
    for (i, step) in steps.iter().take(tool_steps).enumerate() {
        let call = &step["tool_calls"][0];
        let key = format!("{id}:{}:0", i + 1);
        assert_eq!(call["idempotency_key"], key.as_str());
        assert!(
            call["result"].is_string(),
            "step {} of {id} lost its result",
            i + 1
        );
        let starts = call["attempts"].as_u64().expect("attempts") as u32;
        let seen = calls.get(&key).copied().unwrap_or(0);
        assert!(seen >= 1, "{key} never reached the tool server");
        assert!(
            seen <= starts,
            "{key} called {seen} times with only {starts} journaled starts"
        );
        if seen > 1 {
            repeated += 1;
        }
    }
    repeated
}

/// Submits `count` runs of `agent` (inputs `job 0`, `job 1`, …), 16 at a
/// time; their ids in order.
pub async fn submit_many(
    http: &reqwest::Client,
    server: &Server,
    agent: &str,
    count: usize,
) -> Vec<String> {
    use futures_util::StreamExt;
    let inputs: Vec<String> = (0..count).map(|i| format!("job {i}")).collect();
    futures_util::stream::iter(inputs.iter())
        .map(|input| submit(http, server, agent, input))
        .buffered(16)
        .collect()
        .await
}

/// Waits until the mock's tool server has seen `at_least` requests.
pub async fn wait_tool_calls(mock: &Mock, at_least: u64, within: Duration) {
    use std::sync::atomic::Ordering;
    let deadline = Instant::now() + within;
    while mock.counters.tool_requests.load(Ordering::Relaxed) < at_least {
        assert!(
            Instant::now() < deadline,
            "no progress: {} tool calls",
            mock.counters.tool_requests.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
