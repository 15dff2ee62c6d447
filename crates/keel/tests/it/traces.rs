//! OpenTelemetry traces: a real `keel serve --otlp-endpoint` sends its spans
//! to an OTLP/HTTP receiver written here (JSON bodies POSTed to
//! `/v1/traces`, as a collector takes them). One run is one trace: the
//! submit, the root span, every LLM and tool call, with the tool server
//! seeing the tool span as its parent. A collector that fails or is gone
//! costs the runs nothing, and its lost spans show in `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

/// The caller's trace context sent with the submit.
const CALLER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// An OTLP/HTTP trace receiver on 127.0.0.1: keeps every JSON export
/// request, or answers `status` to all of them (`GATEWAY_TIMEOUT`: after
/// a minute, a collector that hangs).
struct Collector {
    url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    async fn start(status: StatusCode) -> Collector {
        type Shared = (Arc<Mutex<Vec<Value>>>, StatusCode);
        async fn export(
            State((bodies, status)): State<Shared>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> (StatusCode, String) {
            assert_eq!(headers["content-type"], "application/json");
            if status == StatusCode::GATEWAY_TIMEOUT {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            if status != StatusCode::OK {
                return (status, "the collector is broken".into());
            }
            let body: Value = serde_json::from_slice(&body).expect("an OTLP JSON body");
            bodies.lock().expect("lock").push(body);
            // ExportTraceServiceResponse, everything accepted.
            (StatusCode::OK, "{}".into())
        }
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .route("/v1/traces", post(export))
            .with_state((bodies.clone(), status));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Collector { url, bodies }
    }

    /// Every span received so far, each with its resource's attributes.
    fn spans(&self) -> Vec<(Value, Value)> {
        let bodies = self.bodies.lock().expect("lock");
        let mut spans = Vec::new();
        for body in bodies.iter() {
            for resource in body["resourceSpans"].as_array().expect("resourceSpans") {
                for scope in resource["scopeSpans"].as_array().expect("scopeSpans") {
                    assert_eq!(scope["scope"]["name"], "keel");
                    for span in scope["spans"].as_array().expect("spans") {
                        spans.push((span.clone(), resource["resource"]["attributes"].clone()));
                    }
                }
            }
        }
        spans
    }
}

/// The value of attribute `key` (`{stringValue|intValue|…}`), if any.
fn attr<'a>(attributes: &'a Value, key: &str) -> Option<&'a Value> {
    attributes
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

fn string(span: &Value, key: &str) -> String {
    attr(&span["attributes"], key)
        .and_then(|v| v["stringValue"].as_str())
        .unwrap_or_else(|| panic!("no string {key} in {span}"))
        .to_string()
}

/// An int64 attribute, written as a string in OTLP JSON.
fn int(span: &Value, key: &str) -> u64 {
    attr(&span["attributes"], key)
        .and_then(|v| v["intValue"].as_str())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no int {key} in {span}"))
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A sample's value in a `/metrics` text (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn traces_follow_a_run_from_submit_through_every_call() {
    let collector = Collector::start(StatusCode::OK).await;
    let mock = Mock::start().await.expect("mock");
    mock.counters.track_traceparents();
    let dir = TempDir::new();
    let mut server = Server::start(&dir.db(), &["--otlp-endpoint", &collector.url]).await;
    let http = reqwest::Client::new();
    register(
        &http,
        &server,
        &agent_yaml("traced", &mock, "tools:2", "echo", ""),
    )
    .await;

    let body = json!({"agent": "traced", "input": "go"});
    let id = submit_with(
        &http,
        server.url("/v1/runs"),
        &body,
        &[("traceparent", CALLER)],
    )
    .await;
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
    let trace_id = id.replace('-', "");

    // The root span comes with the terminal commit; the exporter sends
    // every second.
    let deadline = Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let spans = collector.spans();
        if spans.iter().any(|(s, _)| s["name"] == "run traced") && spans.len() >= 7 {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans missing: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    for (span, resource) in &spans {
        assert_eq!(span["traceId"], trace_id.as_str(), "{span}");
        assert!(
            is_hex(span["spanId"].as_str().expect("spanId"), 16),
            "{span}"
        );
        let start: u64 = span["startTimeUnixNano"]
            .as_str()
            .expect("a string")
            .parse()
            .expect("nanos");
        let end: u64 = span["endTimeUnixNano"]
            .as_str()
            .expect("a string")
            .parse()
            .expect("nanos");
        assert!(start > 1_600_000_000_000_000_000 && start <= end, "{span}");
        assert_eq!(
            attr(resource, "service.name").expect("service.name")["stringValue"],
            "keel"
        );
        assert!(attr(resource, "service.instance.id").is_some());
    }
    let named = |prefix: &str| -> Vec<&Value> {
        spans
            .iter()
            .map(|(s, _)| s)
            .filter(|s| s["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
            .collect()
    };

    // The root: its id is derived from the run id, so every process agrees.
    let roots = named("run ");
    assert_eq!(roots.len(), 1, "{roots:?}");
    let root = roots[0];
    let root_id = format!(
        "{:016x}",
        keel_engine::trace::root_span_id(id.parse().expect("a run id"))
    );
    assert_eq!(root["spanId"], root_id.as_str());
    assert!(root.get("parentSpanId").is_none());
    assert_eq!(root["kind"], 1);
    assert_eq!(root["status"]["code"], 0);
    assert_eq!(string(root, "keel.run_id"), id);
    assert_eq!(string(root, "keel.agent"), "traced");
    assert_eq!(string(root, "keel.version"), "1");
    assert_eq!(string(root, "keel.status"), "COMPLETED");
    let input = run["usage"]["input_tokens"].as_u64().expect("tokens");
    let output = run["usage"]["output_tokens"].as_u64().expect("tokens");
    assert!(input > 0 && output > 0, "{run}");
    assert_eq!(int(root, "gen_ai.usage.input_tokens"), input);
    assert_eq!(int(root, "gen_ai.usage.output_tokens"), output);
    assert!(
        attr(&root["attributes"], "keel.cost_usd").is_some_and(|v| v["doubleValue"].is_number())
    );

    // Three LLM calls (two asking for the tool, one answering), children of the root.
    let llm = named("llm ");
    assert_eq!(llm.len(), 3, "{llm:?}");
    let (mut llm_input, mut llm_output) = (0, 0);
    for span in &llm {
        assert_eq!(span["name"], "llm openai/tools:2");
        assert_eq!(span["parentSpanId"], root_id.as_str());
        assert_eq!(span["kind"], 3);
        assert_eq!(span["status"]["code"], 0);
        assert_eq!(string(span, "gen_ai.system"), "openai");
        assert_eq!(string(span, "gen_ai.request.model"), "tools:2");
        assert!(!string(span, "gen_ai.response.model").is_empty());
        assert_eq!(string(span, "keel.run_id"), id);
        assert_eq!(string(span, "keel.agent"), "traced");
        assert_eq!(string(span, "keel.outcome"), "ok");
        assert_eq!(int(span, "keel.attempt"), 1);
        llm_input += int(span, "gen_ai.usage.input_tokens");
        llm_output += int(span, "gen_ai.usage.output_tokens");
    }
    let mut steps: Vec<u64> = llm.iter().map(|s| int(s, "keel.step")).collect();
    steps.sort();
    assert_eq!(steps, [1, 2, 3], "llm steps");
    assert_eq!(
        (llm_input, llm_output),
        (input, output),
        "the calls' tokens add up to the run's"
    );

    // Two tool calls, children of the root; the tool server saw each one's
    // span as its parent.
    let tools = named("tool ");
    assert_eq!(tools.len(), 2, "{tools:?}");
    let seen = mock.counters.traceparents();
    // The provider was told each LLM call's span as the parent.
    let mut llm_parents: Vec<String> = seen
        .iter()
        .filter(|(key, _)| key == "llm")
        .map(|(_, traceparent)| traceparent.clone())
        .collect();
    let mut expected: Vec<String> = llm
        .iter()
        .map(|s| format!("00-{trace_id}-{}-01", s["spanId"].as_str().expect("spanId")))
        .collect();
    llm_parents.sort();
    expected.sort();
    assert_eq!(llm_parents, expected);
    let seen: Vec<(String, String)> = seen.into_iter().filter(|(key, _)| key != "llm").collect();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let mut tool_steps: Vec<u64> = tools.iter().map(|s| int(s, "keel.step")).collect();
    tool_steps.sort();
    assert_eq!(tool_steps, [1, 2], "the tool calls of the first two steps");
    for span in &tools {
        assert_eq!(span["name"], "tool echo");
        assert_eq!(span["parentSpanId"], root_id.as_str());
        assert_eq!(span["kind"], 3);
        assert_eq!(span["status"]["code"], 0);
        assert_eq!(string(span, "keel.tool.kind"), "http");
        assert_eq!(int(span, "keel.call_index"), 0);
        let key = string(span, "keel.idempotency_key");
        assert_eq!(key, format!("{id}:{}:0", int(span, "keel.step")));
        let (_, traceparent) = seen
            .iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("no tool request with key {key}: {seen:?}"));
        let span_id = span["spanId"].as_str().expect("spanId");
        assert_eq!(traceparent, &format!("00-{trace_id}-{span_id}-01"));
    }

    // The submit: a server span in the run's trace, linked to the caller.
    let submits = named("POST /v1/runs");
    assert_eq!(submits.len(), 1, "{submits:?}");
    let post = submits[0];
    assert_eq!(post["kind"], 2);
    assert_eq!(post["parentSpanId"], root_id.as_str());
    assert_eq!(
        post["links"],
        json!([{"traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331"}])
    );
    assert_eq!(spans.len(), 7, "nothing else: {spans:?}");

    let metrics = metrics_text(&http, &server).await;
    assert_eq!(
        sample(&metrics, "keel_trace_spans_exported_total"),
        7.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "keel_trace_spans_dropped_total{reason=\"queue_full\"}"
        ),
        0.0
    );

    // A run cancelled while its LLM call is slow: its root span (from
    // whichever process committed the cancel) says so, as an error.
    mock.counters.llm_latency_ms.store(3_000, Ordering::Relaxed);
    let slow = submit(&http, &server, "traced", "slow").await;
    wait_for(&http, &server, &slow, "the llm call", |r| {
        r["status"] == "AWAITING_LLM" || r["status"] == "RUNNING"
    })
    .await;
    let r = http
        .post(server.url(&format!("/v1/runs/{slow}/cancel")))
        .send()
        .await
        .expect("cancel");
    assert!(r.status().is_success(), "{}", r.status());
    let run = wait_terminal(&http, &server, &slow, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "CANCELLED", "{run}");
    mock.counters.llm_latency_ms.store(0, Ordering::Relaxed);
    let root = |run_id: &str| {
        let trace_id = run_id.replace('-', "");
        collector
            .spans()
            .into_iter()
            .map(|(s, _)| s)
            .find(|s| s["traceId"] == trace_id.as_str() && s.get("parentSpanId").is_none())
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let cancelled = loop {
        if let Some(span) = root(&slow) {
            break span;
        }
        assert!(
            Instant::now() < deadline,
            "no root span of the cancelled run"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(string(&cancelled, "keel.status"), "CANCELLED");
    assert_eq!(cancelled["status"]["code"], 2, "{cancelled}");

    // What is queued at shutdown is sent before the process exits.
    let last = submit(&http, &server, "traced", "last").await;
    wait_terminal(&http, &server, &last, Duration::from_secs(30)).await;
    terminate(&mut server, Duration::from_secs(20)).await;
    assert!(
        root(&last).is_some(),
        "the last run's root span was not flushed"
    );
}

/// Submits `count` runs of `agent` and waits for them all: how long that took.
async fn batch(http: &reqwest::Client, server: &Server, agent: &str, count: usize) -> Duration {
    let started = Instant::now();
    let ids = submit_many(http, server, agent, count).await;
    for id in &ids {
        let run = wait_terminal(http, server, id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "COMPLETED", "{run}");
    }
    started.elapsed()
}

#[tokio::test]
async fn a_broken_collector_never_slows_runs() {
    let mock = Mock::start().await.expect("mock");
    let failing = Collector::start(StatusCode::INTERNAL_SERVER_ERROR).await;
    let hanging = Collector::start(StatusCode::GATEWAY_TIMEOUT).await;
    let gone = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", listener.local_addr().expect("addr"))
    };
    let http = reqwest::Client::new();
    let yaml = agent_yaml("quick", &mock, "tools:1", "echo", "");

    let dir = TempDir::new();
    let baseline = {
        let server = Server::start(&dir.0.join("base.db"), &[]).await;
        register(&http, &server, &yaml).await;
        batch(&http, &server, "quick", 20).await
    };
    for (i, endpoint) in [failing.url.as_str(), gone.as_str(), hanging.url.as_str()]
        .into_iter()
        .enumerate()
    {
        let server = Server::start(
            &dir.0.join(format!("traced-{i}.db")),
            &["--otlp-endpoint", endpoint],
        )
        .await;
        register(&http, &server, &yaml).await;
        let took = batch(&http, &server, "quick", 20).await;
        assert!(
            took < baseline * 2 + Duration::from_secs(2),
            "{endpoint}: 20 runs took {took:?}, {baseline:?} without traces"
        );
        // Each run: a submit, a root, two LLM calls and a tool call.
        // (A hanging collector costs a 5 s timeout per batch.)
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let metrics = metrics_text(&http, &server).await;
            let failed = sample(
                &metrics,
                "keel_trace_spans_dropped_total{reason=\"export_failed\"}",
            );
            assert_eq!(sample(&metrics, "keel_trace_spans_exported_total"), 0.0);
            if failed >= 100.0 {
                assert_eq!(failed, 100.0, "{metrics}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{endpoint}: {failed} spans counted as failed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let log = std::fs::read_to_string(&server.log).expect("log");
        assert_eq!(
            log.matches("span export failed").count(),
            1,
            "logged once a minute: {log}"
        );
    }
    assert!(failing.spans().is_empty());
}

#[tokio::test]
async fn an_external_workers_call_is_a_tool_span_its_leases_name() {
    let collector = Collector::start(StatusCode::OK).await;
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--otlp-endpoint", &collector.url]).await;
    let http = reqwest::Client::new();
    let yaml = worker_agent("ext", &mock, "");
    register(&http, &server, &yaml).await;
    let id = submit(&http, &server, "ext", "go").await;
    let trace_id = id.replace('-', "");

    // Two leases of one call (the first one given back by failing): both
    // name the call's span as their parent.
    let lease = server.url("/v1/worker/tasks/lease");
    let mut parents = Vec::new();
    for (i, done) in ["fail", "complete"].into_iter().enumerate() {
        let r = http
            .post(&lease)
            .json(&json!({"queue": "images", "worker": "w", "wait": "10s"}))
            .send()
            .await
            .expect("lease");
        assert_eq!(r.status(), 200);
        let task: Value = r.json().await.expect("json");
        let traceparent = task["traceparent"].as_str().expect("traceparent");
        let link = keel_engine::trace::Link::from_traceparent(traceparent).expect("valid");
        assert_eq!(link.trace_id, trace_id);
        parents.push(link.span_id);
        let body = match i {
            0 => json!({"lease_token": task["lease_token"], "error": "busy", "retryable": true}),
            _ => json!({"lease_token": task["lease_token"], "output": "resized"}),
        };
        let url = server.url(&format!(
            "/v1/worker/tasks/{}/{done}",
            task["task_id"].as_str().expect("task id")
        ));
        let r = http.post(url).json(&body).send().await.expect("post");
        assert!(
            r.status().is_success(),
            "{}",
            r.text().await.unwrap_or_default()
        );
    }
    assert_eq!(parents[0], parents[1]);
    let run = wait_terminal(&http, &server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");

    let deadline = Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let spans: Vec<Value> = collector.spans().into_iter().map(|(s, _)| s).collect();
        if spans.iter().any(|s| s["name"] == "run ext") {
            break spans;
        }
        assert!(Instant::now() < deadline, "spans missing: {spans:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let tools: Vec<&Value> = spans
        .iter()
        .filter(|s| s["name"] == "tool resize")
        .collect();
    assert_eq!(
        tools.len(),
        1,
        "one span for the call, its attempts included: {tools:?}"
    );
    let tool = tools[0];
    assert_eq!(tool["traceId"], trace_id.as_str());
    assert_eq!(tool["spanId"], parents[0].as_str());
    let root_id = format!(
        "{:016x}",
        keel_engine::trace::root_span_id(id.parse().expect("a run id"))
    );
    assert_eq!(tool["parentSpanId"], root_id.as_str());
    assert_eq!(string(tool, "keel.tool.kind"), "worker");
    assert_eq!(string(tool, "keel.idempotency_key"), format!("{id}:1:0"));
    assert_eq!(int(tool, "keel.attempt"), 2);
    assert_eq!(tool["status"]["code"], 0);
}
