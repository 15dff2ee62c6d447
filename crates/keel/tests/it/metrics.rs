//! `GET /metrics`: the Prometheus text a real `keel serve` writes, parsed
//! and held against what happened: runs finished, steps, tokens and cost
//! as the run rows report them, LLM latency histograms, a run parked for
//! approval and a call no external worker leased in the queue gauges, a
//! dead letter; on PostgreSQL, an API and a worker process agree on the
//! store's gauges, and a scrape while the database is away still answers.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use keel::mock::Mock;
use serde_json::Value;

use crate::support::*;

/// A scrape: each sample's value by name and labels (sorted), in order of
/// appearance; the format is checked while reading it.
#[derive(Debug)]
struct Scrape {
    samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    /// Each family's TYPE.
    types: BTreeMap<String, String>,
}

impl Scrape {
    /// The value of the sample `name` with exactly `labels` (0 when absent:
    /// counters and gauges not written yet are 0).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        self.samples
            .get(&(name.to_string(), labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// The samples of `name`, each with its labels.
    fn all(&self, name: &str) -> Vec<(&[(String, String)], f64)> {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, labels), value)| (labels.as_slice(), *value))
            .collect()
    }

    /// The sum of the samples of `name` whose labels include `having`.
    fn sum(&self, name: &str, having: &[(&str, &str)]) -> f64 {
        self.all(name)
            .into_iter()
            .filter(|(labels, _)| {
                having
                    .iter()
                    .all(|(k, v)| labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, value)| value)
            .sum()
    }

    /// The samples of the store's gauges (equal in every process on one
    /// database), but the scrape's own duration.
    fn store_gauges(&self) -> BTreeMap<(String, Vec<(String, String)>), f64> {
        let names = [
            "keel_tasks",
            "keel_runs_unfinished",
            "keel_dead_letters",
            "keel_export_enabled",
            "keel_outbox_backlog_entries",
            "keel_outbox_backlog_events",
            "keel_store_up",
        ];
        self.samples
            .iter()
            .filter(|((name, _), _)| names.contains(&name.as_str()))
            .map(|(key, value)| (key.clone(), *value))
            .collect()
    }
}

/// Reads a label set `{a="x",b="y"}` (escapes undone); returns it and the
/// rest of the line.
fn labels(text: &str) -> (Vec<(String, String)>, &str) {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let (name, after) = rest.split_once("=\"").expect("a label name");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next().expect("a closed label value");
            match c {
                '\\' => match chars.next().expect("an escape").1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((name.to_string(), value));
        rest = &after[end + 1..];
    }
}

/// Parses the text format, checking: each family's HELP and TYPE come
/// once, before its samples, and its samples are together; no sample
/// repeats; histograms' buckets are cumulative and end with `+Inf` equal
/// to `_count`.
fn parse(text: &str) -> Scrape {
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    let mut helped = HashSet::new();
    let mut current = String::new();
    let mut finished: HashSet<String> = HashSet::new();
    for line in text.lines() {
        if let Some(help) = line.strip_prefix("# HELP ") {
            let name = help.split(' ').next().expect("a name").to_string();
            assert!(helped.insert(name.clone()), "HELP of {name} twice");
            assert!(!finished.contains(&name), "{name} comes twice");
            finished.insert(std::mem::replace(&mut current, name));
            continue;
        }
        if let Some(kind) = line.strip_prefix("# TYPE ") {
            let (name, kind) = kind.split_once(' ').expect("a type");
            assert_eq!(name, current, "TYPE of {name} without its HELP first");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => panic!("no value: {line}"),
        };
        let (mut labels, rest) = match rest.strip_prefix('{') {
            Some(rest) => labels(rest),
            None => (Vec::new(), rest),
        };
        let value = rest.trim();
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        assert_eq!(family, current, "{line} outside its family");
        labels.sort();
        let key = (name.to_string(), labels);
        assert!(samples.insert(key, value).is_none(), "{line} repeats");
    }
    let scrape = Scrape { samples, types };
    for (family, kind) in &scrape.types {
        if kind != "histogram" {
            continue;
        }
        for (labels, count) in scrape.all(&format!("{family}_count")) {
            let mut buckets: Vec<(f64, f64)> = scrape
                .all(&format!("{family}_bucket"))
                .into_iter()
                .filter(|(l, _)| l.iter().filter(|(k, _)| k != "le").eq(labels.iter()))
                .map(|(l, v)| {
                    let le = &l.iter().find(|(k, _)| k == "le").expect("le").1;
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("a bound")
                    };
                    (le, v)
                })
                .collect();
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            assert!(
                buckets.windows(2).all(|w| w[0].1 <= w[1].1),
                "{family} {labels:?}: {buckets:?}"
            );
            assert_eq!(buckets.last(), Some(&(f64::INFINITY, count)), "{family}");
        }
    }
    scrape
}

/// Scrapes `/metrics`: checks the answer and parses it.
async fn scrape(http: &reqwest::Client, server: &Server) -> Scrape {
    let r = http
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(r.status(), 200);
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    parse(&r.text().await.expect("text"))
}

/// Scrapes until `ready` holds (10 s at most): a commit is visible before
/// the process that made it has counted it.
async fn scrape_until(
    http: &reqwest::Client,
    server: &Server,
    ready: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let scraped = scrape(http, server).await;
        if ready(&scraped) {
            return scraped;
        }
        assert!(Instant::now() < deadline, "never counted: {scraped:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_status(http: &reqwest::Client, server: &Server, id: &str, status: &str) -> Value {
    wait_for(http, server, id, status, |run| run["status"] == status).await
}

/// Runs that completed, one parked for approval, one waiting for an
/// external worker, one whose LLM calls failed into the dead-letter queue:
/// every figure of the scrape matches.
#[tokio::test]
async fn metrics_match_what_the_runs_did() {
    let mock = Mock::start().await.expect("mock");
    let down = Mock::start().await.expect("mock");
    down.counters.llm_down.store(true, Ordering::Relaxed);
    let dir = TempDir::new();
    let config = dir.config("providers:\n  openai:\n    kind: openai\n    models:\n      \"tools:2\": {price: {input: 3, output: 15}}\n",
    );
    let server = Server::start(&dir.db(), &["--config", &config]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("busy", &mock, "tools:2", "echo", ""),
    )
    .await;
    register(
        &http,
        &server,
        &agent_yaml(
            "gated",
            &mock,
            "tools:1",
            "echo",
            "    requires_approval: true\n",
        ),
    )
    .await;
    register(&http, &server, &worker_agent("ext", &mock, "")).await;
    register(
        &http,
        &server,
        &agent_yaml(
            "down",
            &down,
            "tools:3",
            "echo",
            "retry: {max_attempts: 3, backoff: {initial: 50ms, max: 100ms}}",
        ),
    )
    .await;

    let busy = submit_many(&http, &server, "busy", 3).await;
    let gated = submit(&http, &server, "gated", "ask first").await;
    let ext = submit(&http, &server, "ext", "resize it").await;
    let stuck = submit(&http, &server, "down", "will fail").await;
    let mut input_tokens = 0;
    let mut output_tokens = 0;
    let mut cost = 0.0;
    let mut steps = 0;
    for id in &busy {
        let run = wait_terminal(&http, &server, id, Duration::from_secs(30)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
    }
    wait_status(&http, &server, &gated, "AWAITING_APPROVAL").await;
    wait_status(&http, &server, &ext, "AWAITING_TOOL").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_json(&http, &server.url("/v1/dlq")).await["dead_letters"]
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(Instant::now() < deadline, "nothing reached the DLQ");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stuck_status = get_json(&http, &server.url(&format!("/v1/runs/{stuck}"))).await["status"]
        .as_str()
        .expect("status")
        .to_string();
    // What the run rows say (GET /v1/runs).
    let listed = get_json(&http, &server.url("/v1/runs?agent=busy")).await;
    for run in listed["runs"].as_array().expect("runs") {
        input_tokens += run["usage"]["input_tokens"].as_u64().expect("tokens");
        output_tokens += run["usage"]["output_tokens"].as_u64().expect("tokens");
        cost += run["cost_usd"].as_f64().expect("cost");
        steps += run["step_count"].as_u64().expect("steps");
    }
    assert_eq!(steps, 9, "{listed}");

    let m = scrape_until(&http, &server, |m| {
        m.sum("keel_runs_finished_total", &[]) >= 3.0
            && m.sum("keel_tasks_dead_lettered_total", &[]) >= 1.0
            && m.get(
                "keel_steps_total",
                &[("tenant", "default"), ("agent", "gated"), ("kind", "llm")],
            ) >= 1.0
    })
    .await;
    let agent = |name| ("agent", name);
    let tenant = ("tenant", "default");
    // Runs in and out.
    for name in ["gated", "ext", "down"] {
        assert_eq!(
            m.get(
                "keel_runs_submitted_total",
                &[tenant, agent(name), ("origin", "request")]
            ),
            1.0
        );
    }
    assert_eq!(
        m.get(
            "keel_runs_submitted_total",
            &[tenant, agent("busy"), ("origin", "request")]
        ),
        3.0
    );
    assert_eq!(m.sum("keel_runs_finished_total", &[]), 3.0, "{m:?}");
    assert_eq!(
        m.get(
            "keel_runs_finished_total",
            &[tenant, agent("busy"), ("status", "completed")]
        ),
        3.0
    );
    // Steps: the run rows' LLM steps, two tool results per busy run.
    assert_eq!(
        m.get(
            "keel_steps_total",
            &[tenant, agent("busy"), ("kind", "llm")]
        ),
        steps as f64
    );
    assert_eq!(
        m.get(
            "keel_steps_total",
            &[tenant, agent("busy"), ("kind", "tool")]
        ),
        6.0
    );
    assert_eq!(
        m.get(
            "keel_steps_total",
            &[tenant, agent("gated"), ("kind", "llm")]
        ),
        1.0
    );
    assert_eq!(
        m.get(
            "keel_steps_total",
            &[tenant, agent("gated"), ("kind", "tool")]
        ),
        0.0
    );
    // LLM requests, tokens and cost as the run rows count them.
    let model = |name| [("provider", "openai"), ("model", name)];
    let [p, mo] = model("tools:2");
    assert_eq!(
        m.get("keel_llm_requests_total", &[p, mo, ("outcome", "ok")]),
        9.0
    );
    assert_eq!(
        m.get("keel_llm_tokens_total", &[p, mo, ("direction", "input")]),
        input_tokens as f64
    );
    assert_eq!(
        m.get("keel_llm_tokens_total", &[p, mo, ("direction", "output")]),
        output_tokens as f64
    );
    assert!(input_tokens > 0 && output_tokens > 0);
    let priced = m.get("keel_llm_cost_usd_total", &[p, mo]);
    assert!(
        cost > 0.0 && (priced - cost).abs() < 1e-9,
        "{priced} vs {cost}"
    );
    assert_eq!(
        m.get("keel_llm_request_duration_seconds_count", &[p, mo]),
        9.0
    );
    assert!(m.get("keel_llm_request_duration_seconds_sum", &[p, mo]) > 0.0);
    // The failing endpoint: three attempts, two retries, one dead letter.
    let [p3, m3] = model("tools:3");
    assert_eq!(
        m.get(
            "keel_llm_requests_total",
            &[p3, m3, ("outcome", "transient_error")]
        ),
        3.0
    );
    assert_eq!(m.get("keel_task_retries_total", &[("kind", "llm")]), 2.0);
    assert_eq!(
        m.get("keel_tasks_dead_lettered_total", &[("kind", "llm")]),
        1.0
    );
    // Tool calls: the busy runs' six HTTP calls (the other runs made none).
    assert_eq!(
        m.get(
            "keel_tool_calls_total",
            &[("kind", "http"), ("outcome", "ok")]
        ),
        6.0
    );
    assert_eq!(
        m.get("keel_tool_call_duration_seconds_count", &[("kind", "http")]),
        6.0
    );
    // The store: the parked runs and their tasks, the dead letter.
    assert_eq!(m.get("keel_store_up", &[]), 1.0);
    assert_eq!(
        m.get("keel_runs_unfinished", &[("status", "AWAITING_APPROVAL")]),
        1.0
    );
    assert_eq!(
        m.get("keel_runs_unfinished", &[("status", "AWAITING_TOOL")]),
        1.0
    );
    assert_eq!(
        m.get("keel_runs_unfinished", &[("status", stuck_status.as_str())]),
        1.0
    );
    assert_eq!(m.sum("keel_runs_unfinished", &[]), 3.0, "{m:?}");
    assert_eq!(
        m.get(
            "keel_tasks",
            &[
                ("queue", "images"),
                ("kind", "external"),
                ("state", "ready")
            ]
        ),
        1.0
    );
    // It is the only ready task, waiting since its step committed.
    let waited = m.all("keel_tasks_ready_oldest_seconds");
    assert_eq!(waited.len(), 1, "{waited:?}");
    let (labels, seconds) = waited[0];
    assert!(labels.contains(&("queue".to_string(), "images".to_string())));
    assert!((0.0..60.0).contains(&seconds), "{seconds}");
    // Nothing the engine could do now: no task of its own is ready or leased.
    assert_eq!(
        m.sum("keel_tasks", &[("queue", "internal"), ("state", "ready")]),
        0.0
    );
    assert_eq!(
        m.sum("keel_tasks", &[("queue", "internal"), ("state", "leased")]),
        0.0
    );
    assert_eq!(m.get("keel_dead_letters", &[]), 1.0);
    assert_eq!(m.get("keel_export_enabled", &[]), 0.0);
    // A query string is ignored; another method is refused like elsewhere.
    let r = http
        .get(server.url("/metrics?format=json"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let r = http
        .post(server.url("/metrics"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.expect("a JSON error");
    assert_eq!(body["error"]["code"], "method_not_allowed", "{body}");
    // Every family is typed; counters end in _total.
    for (family, kind) in &m.types {
        assert!(family.starts_with("keel_"), "{family}");
        assert_eq!(kind == "counter", family.ends_with("_total"), "{family}");
    }
}

fn worker_args(url: &str) -> Vec<&str> {
    vec!["--database-url", url, "--role", "worker", "--lease", "5s"]
}

/// An API process and a worker process on one PostgreSQL database: their
/// counters show what each did, their store gauges agree; with the
/// database away, a scrape still answers at once, without the gauges.
#[tokio::test]
async fn processes_on_postgres_agree_on_the_store_gauges() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let api = Server::start(&dir.db(), &["--database-url", &db.url, "--role", "api"]).await;
    let worker = Server::start(&dir.db(), &worker_args(&db.url)).await;
    let http = reqwest::Client::new();
    register(&http, &api, &agent_yaml("pg", &mock, "tools:1", "echo", "")).await;
    register(&http, &api, &worker_agent("ext", &mock, "")).await;
    let ids = submit_many(&http, &api, "pg", 4).await;
    let ext = submit(&http, &api, "ext", "resize it").await;
    for id in &ids {
        let run = wait_terminal(&http, &api, id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
    }
    wait_status(&http, &api, &ext, "AWAITING_TOOL").await;

    let completed = [
        ("tenant", "default"),
        ("agent", "pg"),
        ("status", "completed"),
    ];
    let on_worker = scrape_until(&http, &worker, |m| {
        m.get("keel_runs_finished_total", &completed) >= 4.0
            && m.get(
                "keel_steps_total",
                &[("tenant", "default"), ("agent", "ext"), ("kind", "llm")],
            ) >= 1.0
    })
    .await;
    let on_api = scrape(&http, &api).await;
    let gauges = on_api.store_gauges();
    assert_eq!(gauges, on_worker.store_gauges());
    assert_eq!(on_api.get("keel_store_up", &[]), 1.0);
    assert_eq!(
        on_api.get(
            "keel_tasks",
            &[
                ("queue", "images"),
                ("kind", "external"),
                ("state", "ready")
            ]
        ),
        1.0
    );
    assert_eq!(
        on_api.get("keel_runs_unfinished", &[("status", "AWAITING_TOOL")]),
        1.0
    );
    assert_eq!(on_api.sum("keel_runs_unfinished", &[]), 1.0);
    // Each process counts what it did: the API took the submissions, the
    // worker made the steps.
    let submitted = [
        ("tenant", "default"),
        ("agent", "pg"),
        ("origin", "request"),
    ];
    assert_eq!(on_api.get("keel_runs_submitted_total", &submitted), 4.0);
    assert_eq!(on_worker.get("keel_runs_submitted_total", &submitted), 0.0);
    assert_eq!(on_worker.get("keel_runs_finished_total", &completed), 4.0);
    assert_eq!(on_api.sum("keel_runs_finished_total", &[]), 0.0);
    assert_eq!(
        on_worker.get(
            "keel_steps_total",
            &[("tenant", "default"), ("agent", "pg"), ("kind", "llm")]
        ),
        8.0
    );
    assert_eq!(
        on_worker.get(
            "keel_steps_total",
            &[("tenant", "default"), ("agent", "pg"), ("kind", "tool")]
        ),
        4.0
    );

    // The database goes away: the scrape answers within its budget, says
    // so, and still has the process's counters.
    let mut admin = db.admin().await;
    db.allow_connections(&mut admin, false).await;
    db.terminate_sessions(&mut admin).await;
    let started = Instant::now();
    let away = scrape(&http, &worker).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(away.get("keel_store_up", &[]), 0.0);
    assert!(away.all("keel_tasks").is_empty());
    assert!(away.all("keel_runs_unfinished").is_empty());
    assert_eq!(away.get("keel_runs_finished_total", &completed), 4.0);
    db.allow_connections(&mut admin, true).await;
}
