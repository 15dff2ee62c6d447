//! Chaos: a mixed workload (tool loops, fan-out to child runs, sagas,
//! approvals, cancels, submits) while `keel serve` is SIGKILLed again and
//! again at random moments. Every run ends as its kind must, every journal
//! is whole (contiguous, one end, last), and the tool server never saw a
//! key more often than the journal says the call may have been made.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::children::boss;
use crate::support::*;

/// The `keel serve` processes under test: one on a SQLite file, or two
/// (API and workers each) sharing a PostgreSQL database. A kill takes one
/// of them down with SIGKILL and starts it again at once.
struct Cluster {
    dir: TempDir,
    args: Vec<String>,
    servers: Vec<Server>,
    /// Kept until the end: dropping it drops the database.
    _pg: Option<PgDb>,
}

impl Cluster {
    async fn sqlite() -> Cluster {
        Cluster::start(None, 1).await
    }

    /// None: no PostgreSQL here (and not in CI).
    async fn postgres() -> Option<Cluster> {
        let db = PgDb::create().await?;
        Some(Cluster::start(Some(db), 2).await)
    }

    async fn start(pg: Option<PgDb>, processes: usize) -> Cluster {
        let dir = TempDir::new();
        let mut args: Vec<String> = ["--workers", "8", "--webhook-secret", "chaos"]
            .map(String::from)
            .to_vec();
        if let Some(db) = &pg {
            // A killed process's leases expire quickly for the other one.
            args.extend(["--database-url", &db.url, "--lease", "2s"].map(String::from));
        }
        let mut servers = Vec::new();
        for _ in 0..processes {
            servers.push(Cluster::serve(&dir, &args).await);
        }
        Cluster {
            dir,
            args,
            servers,
            _pg: pg,
        }
    }

    async fn serve(dir: &TempDir, args: &[String]) -> Server {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Server::start(&dir.db(), &args).await
    }

    /// The process the test talks to (up between kills).
    fn api(&self) -> &Server {
        &self.servers[0]
    }

    /// SIGKILLs the `round`th process in turn and starts it again.
    async fn kill(&mut self, round: usize) {
        let at = round % self.servers.len();
        self.servers[at].kill();
        self.servers[at] = Cluster::serve(&self.dir, &self.args).await;
    }
}

/// A booking saga on the scripted model: two bookings, then a car whose
/// tool always fails until `max_steps` fails the run, which undoes the
/// two bookings.
fn trip(mock: &Mock) -> String {
    format!(
        r#"
name: trip
version: 1
model:
  provider: scripted
  model: s
  script:
    - tool_calls: [{{name: book_a, arguments: {{ref: A}}}}]
    - tool_calls: [{{name: book_b, arguments: {{ref: B}}}}]
    - tool_calls: [{{name: book_car, arguments: {{ref: C}}}}]
    - tool_calls: [{{name: book_car, arguments: {{ref: C}}}}]
limits: {{max_steps: 4}}
tools:
  - name: book_a
    parameters: {{type: object, properties: {{ref: {{type: string}}}}, required: [ref]}}
    http: {{url: "{echo}", method: POST}}
    idempotent: true
    compensate: {{tool: unbook, arguments: {{booking: "{{{{result.echo.ref}}}}"}}}}
  - name: book_b
    parameters: {{type: object, properties: {{ref: {{type: string}}}}, required: [ref]}}
    http: {{url: "{echo}", method: POST}}
    idempotent: true
    compensate: {{tool: unbook, arguments: {{booking: "{{{{result.echo.ref}}}}"}}}}
  - name: book_car
    parameters: {{type: object, properties: {{ref: {{type: string}}}}, required: [ref]}}
    http: {{url: "{fail}", method: POST, retry: {{max_attempts: 2, backoff: {{initial: 50ms, max: 100ms}}}}}}
    idempotent: true
  - name: unbook
    parameters: {{type: object, properties: {{booking: {{type: string}}}}, required: [booking]}}
    http: {{url: "{echo}", method: POST}}
    idempotent: true
"#,
        echo = mock.tool_url("echo"),
        fail = mock.tool_url("fail"),
    )
}

/// An agent streaming its answers (deltas on the run's stream, compacted
/// into the journal at each step).
fn streamer(mock: &Mock) -> String {
    let yaml = agent_yaml("streamer", mock, "tools:3", "echo", "")
        .replace("  timeout: 10s\n", "  timeout: 10s\n  stream: true\n");
    assert!(yaml.contains("stream: true"), "{yaml}");
    yaml
}

/// An agent whose tool is done by an external worker (queue `chaos`).
fn outsourced(mock: &Mock) -> String {
    format!(
        r#"
name: outsourced
version: 1
model: {{provider: openai, model: "tools:2", base_url: "{llm}", timeout: 10s}}
tools:
  - name: resize
    parameters: {{type: object, properties: {{n: {{type: integer}}}}, required: [n]}}
    worker: chaos
"#,
        llm = mock.llm_url(),
    )
}

/// Submits a run whose end (and parks) are called back to the mock's
/// `chaos` hook.
async fn submit_called_back(
    http: &reqwest::Client,
    server: &Server,
    mock: &Mock,
    agent: &str,
    input: &str,
) -> String {
    let body = json!({"agent": agent, "input": input, "callback_url": mock.hook_url("chaos")});
    submit_to(http, server.url("/v1/runs"), &body).await
}

/// An external worker of queue `chaos` that outlives the server's kills:
/// it leases from whichever process `url` names now, works 30 ms and
/// completes, retrying the completion until the server answers it. Counts
/// the leases of each idempotency key.
fn external_worker(
    url: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    leases: Arc<Mutex<HashMap<String, u32>>>,
) -> tokio::task::JoinHandle<()> {
    let base = move || url.lock().map(|u| u.clone()).unwrap_or_default();
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .expect("client");
        while !stop.load(Ordering::Relaxed) {
            let leased = http
                .post(format!("{}/v1/worker/tasks/lease", base()))
                .json(&json!({"queue": "chaos", "worker": "w", "wait": "500ms", "lease": "5s"}))
                .send()
                .await;
            let task: Value = match leased {
                Ok(r) if r.status() == 200 => r.json().await.unwrap_or(Value::Null),
                Ok(_) => continue,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let key = task["idempotency_key"].as_str().unwrap_or("").to_string();
            if let Ok(mut leases) = leases.lock() {
                *leases.entry(key.clone()).or_insert(0) += 1;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
            let id = task["task_id"].as_str().unwrap_or("");
            let body =
                json!({"lease_token": task["lease_token"], "output": format!("resized {key}")});
            for _ in 0..100 {
                let done = http
                    .post(format!("{}/v1/worker/tasks/{id}/complete", base()))
                    .json(&body)
                    .send()
                    .await;
                match done.map(|r| r.status().as_u16()) {
                    // Done, or the lease is gone (expired while the server
                    // was down: leased again, with the same key).
                    Ok(200 | 404 | 409) => break,
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        }
    })
}

/// Approves every pending approval (a decision the server refuses because
/// it was already made is fine: the kill may have come after it).
async fn approve_all(http: &reqwest::Client, server: &Server) {
    let inbox = get_json(http, &server.url("/v1/approvals?status=pending&limit=100")).await;
    for a in inbox["approvals"].as_array().into_iter().flatten() {
        let (Some(run), Some(approval)) = (a["run_id"].as_str(), a["id"].as_str()) else {
            panic!("an inbox entry without ids: {a}");
        };
        let (status, body) =
            decide(http, server, run, approval, json!({"decision": "approve"})).await;
        assert!(status == 200 || status == 409, "{status}: {body}");
    }
}

/// A run's journal: (seq, event type, the event) in order.
async fn journal(http: &reqwest::Client, server: &Server, id: &str) -> Vec<(i64, String, Value)> {
    sse(http, &server.url(&format!("/v1/runs/{id}/events")), None)
        .await
        .into_iter()
        .map(|(seq, _, data)| {
            let event = data["event"].clone();
            (seq, event["type"].as_str().unwrap_or("").to_string(), event)
        })
        .collect()
}

#[tokio::test]
async fn a_mixed_workload_survives_repeated_sigkills_on_sqlite() {
    mixed_workload_under_kills(Cluster::sqlite().await).await;
}

#[tokio::test]
async fn a_mixed_workload_survives_repeated_sigkills_on_two_postgres_processes() {
    let Some(cluster) = Cluster::postgres().await else {
        return;
    };
    mixed_workload_under_kills(cluster).await;
}

async fn mixed_workload_under_kills(mut cluster: Cluster) {
    let seed = fastrand::u64(..);
    // Printed so that a failure can be replayed with the same kill timing.
    eprintln!("chaos seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mock = Mock::start().await.expect("mock");
    mock.counters.llm_latency_ms.store(40, Ordering::Relaxed);
    let http = reqwest::Client::new();
    register(
        &http,
        cluster.api(),
        &agent_yaml("looper", &mock, "tools:8", "echo", ""),
    )
    .await;
    register(
        &http,
        cluster.api(),
        &agent_yaml(
            "gated",
            &mock,
            "tools:2",
            "echo",
            "    requires_approval: true",
        ),
    )
    .await;
    register(&http, cluster.api(), &trip(&mock)).await;
    register(&http, cluster.api(), &streamer(&mock)).await;
    register(&http, cluster.api(), &outsourced(&mock)).await;
    let url = Arc::new(Mutex::new(cluster.api().url.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let leases = Arc::new(Mutex::new(HashMap::new()));
    let worker = external_worker(url.clone(), stop.clone(), leases.clone());
    let kids: Vec<Value> = (0..3)
        .map(|i| json!({"agent": "looper", "input": format!("part {i}")}))
        .collect();
    register(&http, cluster.api(), &boss(&Value::Array(kids), "looper")).await;

    let mut kinds: Vec<(String, &str)> = Vec::new();
    for i in 0..16 {
        kinds.push((
            submit(&http, cluster.api(), "looper", &format!("job {i}")).await,
            "looper",
        ));
    }
    for i in 0..3 {
        kinds.push((
            submit(&http, cluster.api(), "boss", &format!("split {i}")).await,
            "boss",
        ));
    }
    for i in 0..3 {
        kinds.push((
            submit(&http, cluster.api(), "trip", &format!("trip {i}")).await,
            "trip",
        ));
    }
    for i in 0..4 {
        kinds.push((
            submit(&http, cluster.api(), "gated", &format!("pay {i}")).await,
            "gated",
        ));
    }

    let mut called_back = Vec::new();
    for (i, agent) in [
        "streamer",
        "streamer",
        "streamer",
        "outsourced",
        "outsourced",
        "gated",
    ]
    .into_iter()
    .enumerate()
    {
        let id = submit_called_back(&http, cluster.api(), &mock, agent, &format!("cb {i}")).await;
        kinds.push((id.clone(), agent));
        called_back.push(id);
    }

    // Kill it at random moments while most of the work is still to do;
    // between kills, approve what waits, cancel some runs, submit more.
    let mut cancelled: HashMap<String, bool> = HashMap::new();
    let mut kills = Vec::new();
    let started = Instant::now();
    while kills.len() < 8 && mock.counters.tool_requests.load(Ordering::Relaxed) < 250 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no progress: {} tool calls",
            mock.counters.tool_requests.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(rng.u64(100..400))).await;
        approve_all(&http, cluster.api()).await;
        match kills.len() {
            1 => {
                for (id, _) in kinds.iter().take(3) {
                    let r = http
                        .post(cluster.api().url(&format!("/v1/runs/{id}/cancel")))
                        .send()
                        .await
                        .expect("cancel");
                    let status = r.status().as_u16();
                    assert!(status == 200 || status == 409, "cancel answered {status}");
                    cancelled.insert(id.clone(), status == 200);
                }
            }
            2 => {
                for i in 0..6 {
                    kinds.push((
                        submit(&http, cluster.api(), "looper", &format!("late {i}")).await,
                        "looper",
                    ));
                }
                for i in 0..3 {
                    kinds.push((
                        submit(&http, cluster.api(), "trip", &format!("late trip {i}")).await,
                        "trip",
                    ));
                }
            }
            _ => {}
        }
        cluster.kill(kills.len()).await;
        kills.push(mock.counters.tool_requests.load(Ordering::Relaxed));
        if let Ok(mut url) = url.lock() {
            *url = cluster.api().url.clone();
        }
    }
    assert!(
        kills.len() >= 3,
        "only {} kills landed before the work was nearly done ({kills:?})",
        kills.len()
    );

    // Then let it finish, approving as approvals come up.
    let mut runs: HashMap<String, Value> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while runs.len() < kinds.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} runs did not finish (seed {seed})",
            kinds.len() - runs.len(),
            kinds.len()
        );
        approve_all(&http, cluster.api()).await;
        for (id, _) in &kinds {
            if runs.contains_key(id) {
                continue;
            }
            let run = get_json(&http, &cluster.api().url(&format!("/v1/runs/{id}"))).await;
            if matches!(
                run["status"].as_str(),
                Some("COMPLETED" | "FAILED" | "CANCELLED")
            ) {
                runs.insert(id.clone(), run);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each run ended as its kind must.
    let mut all: Vec<(String, Value)> = Vec::new();
    for (id, kind) in &kinds {
        let run = runs[id].clone();
        match (*kind, cancelled.get(id)) {
            (_, Some(true)) => assert_eq!(run["status"], "CANCELLED", "{run}"),
            (_, Some(false)) => assert_eq!(run["status"], "COMPLETED", "{run}"),
            ("looper" | "gated" | "streamer" | "outsourced", None) => {
                assert_eq!(run["status"], "COMPLETED", "{run}")
            }
            ("boss", None) => {
                assert_eq!(run["status"], "COMPLETED", "{run}");
                let results = fan_in(&run);
                let results = results.as_array().expect("a fan-in array");
                assert_eq!(results.len(), 3, "{run}");
                for result in results {
                    assert_eq!(result["status"], "COMPLETED", "{result}");
                }
                for child in run["children"].as_array().expect("children") {
                    let child_id = child["run_id"].as_str().expect("child id");
                    let child_run =
                        get_json(&http, &cluster.api().url(&format!("/v1/runs/{child_id}"))).await;
                    assert_eq!(child_run["status"], "COMPLETED", "{child_run}");
                    all.push((child_id.to_string(), child_run));
                }
            }
            ("trip", None) => {
                assert_eq!(run["status"], "FAILED", "{run}");
                assert_eq!(run["error_code"], "max_steps", "{run}");
                let saga = &run["compensation"];
                assert_eq!(saga["status"], "done", "{run}");
                assert_eq!(
                    (saga["completed"].as_u64(), saga["failed"].as_u64()),
                    (Some(2), Some(0)),
                    "{run}"
                );
            }
            (other, None) => panic!("unknown kind {other}"),
        }
        all.push((id.clone(), run));
    }

    // Every journal is whole, and ends once, last.
    let mut starts: HashMap<String, (u32, String)> = HashMap::new();
    let mut completed_keys = Vec::new();
    for (id, run) in &all {
        let events = journal(&http, cluster.api(), id).await;
        let seqs: Vec<i64> = events.iter().map(|e| e.0).collect();
        assert_eq!(
            seqs,
            (1..=events.len() as i64).collect::<Vec<_>>(),
            "{id}: journal not contiguous"
        );
        let ends: Vec<usize> = events
            .iter()
            .enumerate()
            .filter(|(_, e)| {
                matches!(
                    e.1.as_str(),
                    "run_completed" | "run_failed" | "run_cancelled"
                )
            })
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ends, vec![events.len() - 1], "{id}: one end, last");
        for (_, kind, event) in &events {
            if kind == "tool_call_started" || kind == "compensation_started" {
                let key = event["idempotency_key"].as_str().expect("key").to_string();
                let tool = event["tool"].as_str().unwrap_or("").to_string();
                let entry = starts.entry(key.clone()).or_insert((0, tool));
                entry.0 += 1;
                if run["status"] == "COMPLETED" || run["status"] == "FAILED" {
                    completed_keys.push((key, id.clone(), event["tool"].clone()));
                }
            }
            // An external call's result is what the worker sent for its key.
            if kind == "tool_call_completed" && run["agent"] == "outsourced" {
                let key = format!(
                    "{id}:{}:{}",
                    event["step"].as_u64().unwrap_or(0),
                    event["call_index"].as_u64().unwrap_or(0)
                );
                assert_eq!(event["output"], format!("resized {key}"), "{event}");
            }
        }
    }

    // No call reached the tool server more often than it was started (the
    // failing car's tool retries once within each start); every call of a
    // run that finished reached it.
    let calls = mock.counters.key_counts();
    for (key, seen) in &calls {
        let Some((started, tool)) = starts.get(key) else {
            panic!("{key} reached the tool server but was never journaled as started");
        };
        let per_start = if tool == "book_car" { 2 } else { 1 };
        assert!(
            *seen <= started * per_start,
            "{key} ({tool}) called {seen} times with {started} journaled starts (seed {seed})"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = worker.await;
    let leases = leases.lock().map(|l| l.clone()).unwrap_or_default();
    for (key, id, tool) in &completed_keys {
        match tool.as_str() {
            // The boss's `delegate` (spawn_agents) is built in.
            Some("delegate") => continue,
            // Done by the external worker, at least once per call.
            Some("resize") => {
                assert!(leases.contains_key(key), "{key} was never leased");
                continue;
            }
            _ => {}
        }
        if !calls.contains_key(key) {
            let events = journal(&http, cluster.api(), id).await;
            let kinds: Vec<&str> = events.iter().map(|e| e.1.as_str()).collect();
            panic!(
                "{key} never reached the tool server: {} {kinds:?} (seed {seed})",
                runs.get(id).map(|r| r["agent"].clone()).unwrap_or_default()
            );
        }
    }
    assert_eq!(mock.counters.bad_traceparents.load(Ordering::Relaxed), 0);

    // Every end of a run submitted with a callback_url was called back
    // (at least once: a kill may repeat a delivery), signed, with the status
    // the run ended with.
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &called_back {
        let status = runs[id]["status"].as_str().unwrap_or("").to_string();
        let event = format!("run.{}", status.to_lowercase());
        loop {
            let hooks = mock.counters.hooks();
            let mine: Vec<Value> = hooks
                .iter()
                .filter(|h| h.name == "chaos" && h.event.as_deref() == Some(event.as_str()))
                .filter(|h| h.signature.is_some())
                .filter_map(|h| serde_json::from_str::<Value>(&h.body).ok())
                .filter(|b| b["run_id"] == id.as_str())
                .collect();
            if let Some(body) = mine.first() {
                assert_eq!(body["status"], status.as_str(), "{body}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{id} ended {status}: no {event} callback"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let repeated: u32 = calls
        .iter()
        .filter(|(k, _)| starts.get(*k).is_some_and(|(_, t)| t != "book_car"))
        .map(|(_, n)| n.saturating_sub(1))
        .sum();
    eprintln!(
        "chaos: {} kills at {kills:?} tool calls, {} runs, {} keys, {repeated} repeated calls, {} external calls leased {} times",
        kills.len(),
        all.len(),
        calls.len(),
        leases.len(),
        leases.values().sum::<u32>()
    );
}
