//! Hostile input at every route of the API (`api/mod.rs`, `api/worker.rs`):
//! malformed and mistyped JSON, missing and unknown fields, absurd numbers,
//! deep nesting, long strings, NUL bytes and invalid UTF-8, bad ids, query
//! strings and headers, hostile agent specs. Each request gets its 4xx (or a
//! 2xx where it is valid) with a JSON error naming what is wrong, quickly,
//! and the server serves a valid run afterwards. On SQLite and PostgreSQL.

use std::time::{Duration, Instant};

use keel::mock::Mock;
use reqwest::Method;
use reqwest::header::HeaderValue;
use serde_json::{Value, json};

use crate::support::*;

/// Longest a hostile request may take to be answered.
const QUICK: Duration = Duration::from_secs(5);

/// One request and what it must get: its status, and words its error
/// message must hold (none for a success).
struct Case {
    method: Method,
    path: String,
    headers: Vec<(&'static str, HeaderValue)>,
    body: Vec<u8>,
    status: u16,
    words: Vec<String>,
}

fn case(method: Method, path: impl Into<String>, body: impl Into<Vec<u8>>) -> Case {
    Case {
        method,
        path: path.into(),
        headers: Vec::new(),
        body: body.into(),
        status: 0,
        words: Vec::new(),
    }
}

fn get(path: impl Into<String>) -> Case {
    case(Method::GET, path, Vec::new())
}

fn post(path: impl Into<String>, body: impl Into<Vec<u8>>) -> Case {
    case(Method::POST, path, body)
}

impl Case {
    /// Must get `status` with an error message holding every word.
    fn wants(mut self, status: u16, words: &[&str]) -> Case {
        self.status = status;
        self.words = words.iter().map(|w| w.to_string()).collect();
        self
    }

    fn header(mut self, name: &'static str, value: HeaderValue) -> Case {
        self.headers.push((name, value));
        self
    }
}

/// Sends each case on one connection pool; returns what went wrong.
async fn run(server: &Server, cases: Vec<Case>) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut failures = Vec::new();
    for case in cases {
        let shown = format!(
            "{} {} [{}]",
            case.method,
            clip(&case.path),
            clip(&String::from_utf8_lossy(&case.body))
        );
        let mut request = http
            .request(case.method.clone(), server.url(&case.path))
            .body(case.body.clone());
        if !case.headers.iter().any(|(n, _)| *n == "content-type") {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in &case.headers {
            request = request.header(*name, value.clone());
        }
        let started = Instant::now();
        let response = match tokio::time::timeout(QUICK, request.send()).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                failures.push(format!("{shown}: no answer: {e}"));
                continue;
            }
            Err(_) => {
                failures.push(format!("{shown}: no answer within {QUICK:?}"));
                continue;
            }
        };
        let status = response.status().as_u16();
        let json = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| t.starts_with("application/json"));
        let text = match tokio::time::timeout(QUICK, response.text()).await {
            Ok(Ok(text)) => text,
            _ => {
                failures.push(format!("{shown}: the body did not come"));
                continue;
            }
        };
        let took = started.elapsed();
        if took > QUICK {
            failures.push(format!("{shown}: took {took:?}"));
        }
        if status != case.status {
            failures.push(format!(
                "{shown}: {status} instead of {}: {}",
                case.status,
                clip(&text)
            ));
            continue;
        }
        if status < 400 {
            continue;
        }
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or("");
        if !json || body["error"]["code"].as_str().is_none() || message.is_empty() {
            failures.push(format!("{shown}: not a JSON error: {}", clip(&text)));
            continue;
        }
        for word in &case.words {
            if !message.contains(word.as_str()) {
                failures.push(format!(
                    "{shown}: the message does not name `{word}`: {}",
                    clip(message)
                ));
            }
        }
        if message.len() > 4096 {
            failures.push(format!(
                "{shown}: a {} byte message: {}",
                message.len(),
                clip(message)
            ));
        }
    }
    failures
}

fn clip(text: &str) -> String {
    if text.len() <= 160 {
        return text.to_string();
    }
    let mut end = 160;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// `depth` nested JSON arrays.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// A JSON object text with `field` set to raw JSON `value`, over `base`.
fn with(base: &Value, field: &str, value: &str) -> Vec<u8> {
    let mut object = base.as_object().cloned().unwrap_or_default();
    object.remove(field);
    let rest = serde_json::to_string(&Value::Object(object)).unwrap_or_default();
    let rest = rest.trim_start_matches('{');
    let sep = if rest == "}" { "" } else { "," };
    format!("{{\"{field}\":{value}{sep}{rest}").into_bytes()
}

/// `base` without `field`.
fn without(base: &Value, field: &str) -> Vec<u8> {
    let mut object = base.as_object().cloned().unwrap_or_default();
    object.remove(field);
    serde_json::to_vec(&Value::Object(object)).unwrap_or_default()
}

/// Values of the wrong JSON type for a field of type `kind`.
fn wrong_types(kind: &str) -> Vec<&'static str> {
    let all = [
        ("string", "\"text\""),
        ("number", "12"),
        ("float", "1.5"),
        ("bool", "true"),
        ("array", "[1]"),
        ("object", "{\"a\":1}"),
    ];
    all.iter()
        .filter(|(k, _)| *k != kind && !(kind == "number" && *k == "float"))
        .map(|(_, v)| *v)
        .collect()
}

/// A valid body of each route of a leased task.
fn worker_bodies() -> [(&'static str, Value); 3] {
    [
        ("heartbeat", json!({"lease_token": "1"})),
        ("complete", json!({"lease_token": "1", "output": "x"})),
        ("fail", json!({"lease_token": "1", "error": "x"})),
    ]
}

fn hv(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).expect("header value")
}

/// What every JSON body route must refuse whatever its fields: bodies that
/// are not a JSON object.
fn not_objects(method: Method, path: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let deep = nested(10_000);
    let bodies: Vec<(Vec<u8>, &[&str])> = vec![
        (b"{\"a\":".to_vec(), &["invalid JSON"]),
        (b"{not json".to_vec(), &["invalid JSON"]),
        (b"[]".to_vec(), &["invalid JSON"]),
        (b"\"text\"".to_vec(), &["invalid JSON"]),
        (b"12".to_vec(), &["invalid JSON"]),
        (b"null".to_vec(), &["invalid JSON"]),
        (b"{}{}".to_vec(), &["invalid JSON"]),
        (deep.clone().into_bytes(), &["invalid JSON"]),
        (b"{\"a\":\"\xff\xfe\"}".to_vec(), &["invalid JSON"]),
        (b"{\"a\x00\":1}".to_vec(), &["invalid JSON"]),
        (b"\xef\xbb\xbf{}".to_vec(), &["invalid JSON"]),
        (b"agent=ok&input=x".to_vec(), &["invalid JSON"]),
    ];
    for (body, words) in bodies {
        cases.push(case(method.clone(), path, body).wants(400, words));
    }
    // The wrong Content-Type changes nothing: the body is still read as JSON.
    cases.push(
        case(method.clone(), path, b"<xml/>".to_vec())
            .header("content-type", hv("application/xml"))
            .wants(400, &["invalid JSON"]),
    );
    cases
}

/// Field-by-field cases for a JSON body route: `valid` is a complete body
/// and the status it gets; `fields` the fields and their JSON types;
/// `required` those that must be present.
fn fields(
    path: &str,
    valid: &Value,
    fields: &[(&str, &str)],
    required: &[&str],
    valid_status: u16,
) -> Vec<Case> {
    let mut cases = not_objects(Method::POST, path);
    cases.push(post(path, serde_json::to_vec(valid).unwrap_or_default()).wants(valid_status, &[]));
    // Any Content-Type: a valid body is valid.
    cases.push(
        post(path, serde_json::to_vec(valid).unwrap_or_default())
            .header("content-type", hv("text/plain"))
            .wants(valid_status, &[]),
    );
    cases.push(post(path, with(valid, "colour", "1")).wants(400, &["colour"]));
    cases.push(post(path, with(valid, "\\u0000", "1")).wants(400, &["unknown field"]));
    let deep = nested(10_000);
    for (field, kind) in fields {
        // A JSON value field takes any type.
        if *kind != "any" {
            for wrong in wrong_types(kind) {
                cases.push(post(path, with(valid, field, wrong)).wants(400, &[field]));
            }
        }
        cases.push(post(path, with(valid, field, &deep)).wants(400, &[field]));
        cases.push(post(path, with(valid, field, "\"\\ud800\"")).wants(400, &[field]));
        if required.contains(field) {
            cases.push(post(path, without(valid, field)).wants(400, &[field]));
        }
    }
    cases
}

async fn hostile_requests(server: &Server, mock: &Mock) {
    let http = reqwest::Client::new();
    register(
        &http,
        server,
        &agent_yaml("ok", mock, "tools:1", "echo", ""),
    )
    .await;
    let done = submit(&http, server, "ok", "first").await;
    wait_terminal(&http, server, &done, Duration::from_secs(30)).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let long_id = "7".repeat(10_000);
    let long = "x".repeat(500_000);
    let ids = [
        ("not-a-uuid", 404),
        (long_id.as_str(), 404),
        (unknown.as_str(), 404),
        ("%FF%FE", 400),
        ("%00", 404),
    ];
    let mut cases = Vec::new();

    // POST /v1/runs
    let submit_body = json!({"agent": "ok", "input": "x"});
    cases.extend(fields(
        "/v1/runs",
        &submit_body,
        &[
            ("agent", "string"),
            ("input", "any"),
            ("version", "any"),
            ("priority", "any"),
            ("callback_url", "any"),
        ],
        &["agent", "input"],
        202,
    ));
    for bad in ["true", "[1]", "{}", "1e400"] {
        cases.push(post("/v1/runs", with(&submit_body, "version", bad)).wants(400, &["version"]));
    }
    for bad in [
        "-1",
        "10",
        "1.5",
        "1e30",
        "18446744073709551616",
        "\"5\"",
        "true",
    ] {
        cases.push(post("/v1/runs", with(&submit_body, "priority", bad)).wants(400, &["priority"]));
    }
    let far_url = format!("\"http://a/{}\"", "p".repeat(3000));
    for bad in ["5", "\"ftp://x\"", "\"javascript:alert(1)\"", &far_url] {
        cases.push(
            post("/v1/runs", with(&submit_body, "callback_url", bad)).wants(400, &["callback_url"]),
        );
    }
    cases.push(post("/v1/runs", with(&submit_body, "input", "null")).wants(400, &["input"]));
    // Fields by position are not fields.
    cases.push(post("/v1/runs", br#"["ok", "x"]"#.to_vec()).wants(400, &["object"]));
    for bad in ["\"\"", "\"   \""] {
        cases.push(post("/v1/runs", with(&submit_body, "agent", bad)).wants(400, &["agent"]));
    }
    cases.push(
        post(
            "/v1/runs",
            with(&submit_body, "agent", &format!("\"{long}\"")),
        )
        .wants(422, &["agent"]),
    );
    cases.push(
        post("/v1/runs", with(&submit_body, "agent", "\"a\\u0000b\"")).wants(422, &["agent"]),
    );
    cases.push(
        post(
            "/v1/runs",
            with(&submit_body, "version", &format!("\"{long}\"")),
        )
        .wants(422, &["version"]),
    );
    // Valid input: long, NUL, deep but within the limit.
    cases.push(
        post(
            "/v1/runs",
            with(&submit_body, "input", &format!("\"{long}\"")),
        )
        .wants(202, &[]),
    );
    cases.push(
        post(
            "/v1/runs",
            with(&submit_body, "input", "\"nul \\u0000 here\""),
        )
        .wants(202, &[]),
    );
    cases.push(post("/v1/runs", with(&submit_body, "input", &nested(100))).wants(202, &[]));
    cases.push(post("/v1/runs", with(&submit_body, "input", "1e308")).wants(202, &[]));
    for (key, words) in [
        (hv(""), "Idempotency-Key"),
        (hv(&"k".repeat(10_000)), "Idempotency-Key"),
        (
            HeaderValue::from_bytes("clé-ünïcode".as_bytes()).expect("header"),
            "Idempotency-Key",
        ),
    ] {
        cases.push(
            post(
                "/v1/runs",
                serde_json::to_vec(&submit_body).unwrap_or_default(),
            )
            .header("idempotency-key", key)
            .wants(400, &[words]),
        );
    }

    // GET /v1/runs
    for (query, words) in [
        ("status=bogus", "status"),
        ("status=%FF", "status"),
        ("limit=-1", "limit"),
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=1000000000000", "limit"),
        ("limit=1.5", "limit"),
        ("limit=", "limit"),
        ("limit=1&limit=2", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=%00", "cursor"),
        ("colour=red", "colour"),
    ] {
        cases.push(get(format!("/v1/runs?{query}")).wants(400, &[words]));
    }
    cases.push(get(format!("/v1/runs?cursor={long_id}")).wants(400, &["cursor"]));
    for query in ["agent=%00", "agent=%FF", "agent=a%20b"] {
        cases.push(get(format!("/v1/runs?{query}")).wants(400, &["agent"]));
        cases.push(get(format!("/v1/approvals?{query}")).wants(400, &["agent"]));
    }
    cases.push(get(format!("/v1/runs?agent={}", "a".repeat(10_000))).wants(400, &["agent"]));
    for query in ["agent=ghost", "agent=", "status=", "cursor=", "limit=500"] {
        cases.push(get(format!("/v1/runs?{query}")).wants(200, &[]));
    }

    // GET /v1/runs/{id}, its events, cancel, approvals; POST /v1/dlq/{id}/retry
    for (id, status) in ids {
        let words: &[&str] = if status == 404 {
            &["not found"]
        } else {
            &["path"]
        };
        cases.push(get(format!("/v1/runs/{id}")).wants(status, words));
        cases.push(get(format!("/v1/runs/{id}/events")).wants(status, words));
        cases.push(post(format!("/v1/runs/{id}/cancel"), Vec::new()).wants(status, words));
        cases.push(
            post(
                format!("/v1/runs/{id}/approvals/1.0.1"),
                br#"{"decision": "approve"}"#.to_vec(),
            )
            .wants(status, words),
        );
        cases.push(post(format!("/v1/dlq/{id}/retry"), Vec::new()).wants(status, words));
        cases.push(get(format!("/v1/agents/{id}")).wants(status, words));
        cases.push(get(format!("/v1/agents/{id}/usage")).wants(status, words));
        // A task that is not leased: its token is stale (409).
        let (status, words): (u16, &[&str]) = if id == unknown {
            (409, &["not leased"])
        } else {
            (status, words)
        };
        for (route, body) in worker_bodies() {
            cases.push(
                post(format!("/v1/worker/tasks/{id}/{route}"), body.to_string())
                    .wants(status, words),
            );
        }
    }
    for (query, words) in [
        ("after=abc", "after"),
        ("after=1.5", "after"),
        ("after=99999999999999999999", "after"),
        ("after=1&after=2", "after"),
        ("since=1", "since"),
    ] {
        cases.push(get(format!("/v1/runs/{done}/events?{query}")).wants(400, &[words]));
    }
    for last_event_id in [
        "abc",
        "-1",
        "1.2",
        "1.2.3.4.5",
        "1..2.3",
        "99999999999999999999",
        "",
        " ",
        "1.-2.3.4",
    ] {
        cases.push(
            get(format!("/v1/runs/{done}/events"))
                .header("last-event-id", hv(last_event_id))
                .wants(400, &["Last-Event-ID"]),
        );
    }
    cases.push(
        get(format!("/v1/runs/{done}/events"))
            .header(
                "last-event-id",
                HeaderValue::from_bytes("٣".as_bytes()).expect("header"),
            )
            .wants(400, &["Last-Event-ID"]),
    );
    // Past the end of a finished run's journal: an empty stream that ends.
    for last_event_id in ["9223372036854775807", "5.4294967295.4294967295.4294967295"] {
        cases.push(
            get(format!("/v1/runs/{done}/events"))
                .header("last-event-id", hv(last_event_id))
                .wants(200, &[]),
        );
    }
    cases.push(get(format!("/v1/runs/{done}/events?after=9223372036854775807")).wants(200, &[]));
    cases.push(get(format!("/v1/runs/{done}/events?after=-9223372036854775808")).wants(200, &[]));

    // POST /v1/runs/{id}/cancel (the run is over: a valid cancel conflicts)
    let cancel = format!("/v1/runs/{done}/cancel");
    cases.extend(fields(
        &cancel,
        &json!({"reason": "because"}),
        &[("reason", "string")],
        &[],
        409,
    ));
    cases.push(post(&cancel, Vec::new()).wants(409, &[]));
    cases.push(post(&cancel, format!(r#"{{"reason": "{long}"}}"#)).wants(409, &[]));

    // POST /v1/runs/{id}/approvals/{approval_id}
    let decide = format!("/v1/runs/{done}/approvals/1.0.1");
    cases.extend(fields(
        &decide,
        &json!({"decision": "reject", "reason": "no", "by": "me"}),
        &[
            ("decision", "string"),
            ("reason", "string"),
            ("by", "string"),
            ("arguments", "any"),
        ],
        &["decision"],
        409,
    ));
    for (body, status, words) in [
        (r#"{"decision": "maybe"}"#, 400, "decision"),
        (r#"{"decision": "APPROVE"}"#, 400, "decision"),
        (r#"{"decision": "reject"}"#, 422, "reason"),
        (r#"{"decision": "reject", "reason": "  "}"#, 422, "reason"),
        (
            r#"{"decision": "reject", "reason": "no", "arguments": {}}"#,
            422,
            "arguments",
        ),
        (
            r#"{"decision": "approve", "arguments": "x"}"#,
            422,
            "arguments",
        ),
        (
            r#"{"decision": "approve", "arguments": [1]}"#,
            422,
            "arguments",
        ),
        (r#"{"decision": "approve", "by": ""}"#, 422, "by"),
    ] {
        cases.push(post(&decide, body).wants(status, &[words]));
    }
    cases.push(
        post(
            &decide,
            format!(r#"{{"decision": "approve", "by": "{}"}}"#, "b".repeat(201)),
        )
        .wants(422, &["by"]),
    );
    cases.push(
        post(
            &decide,
            format!(r#"{{"decision": "reject", "reason": "{long}"}}"#),
        )
        .wants(422, &["reason"]),
    );
    cases.push(
        post(&decide, br#"{"decision": "approve"}"#.to_vec())
            .header(
                "keel-actor",
                HeaderValue::from_bytes("zoë".as_bytes()).expect("header"),
            )
            .wants(400, &["Keel-Actor"]),
    );
    cases.push(
        post(
            format!("/v1/runs/{done}/approvals/{long_id}"),
            br#"{"decision": "approve"}"#.to_vec(),
        )
        .wants(409, &["COMPLETED"]),
    );
    cases.push(
        post(
            format!("/v1/runs/{done}/approvals/%FF"),
            br#"{"decision": "approve"}"#.to_vec(),
        )
        .wants(400, &["path"]),
    );

    // GET /v1/approvals
    for (query, words) in [
        ("status=bogus", "status"),
        ("limit=-1", "limit"),
        ("limit=0", "limit"),
        ("limit=1000000000000", "limit"),
        ("cursor=garbage", "cursor"),
        ("cursor=x:1.2.3", "cursor"),
        ("cursor=x:1.2.99999999999", "cursor"),
        ("colour=red", "colour"),
    ] {
        cases.push(get(format!("/v1/approvals?{query}")).wants(400, &[words]));
    }
    cases.push(
        get(format!("/v1/approvals?cursor={unknown}:1.2.99999999999")).wants(400, &["cursor"]),
    );
    cases.push(get(format!("/v1/approvals?cursor={unknown}:1.2.3")).wants(200, &[]));

    // GET /v1/agents/{name}, its usage, GET /v1/usage
    cases.push(get("/v1/agents/ok?version=%00").wants(404, &["not found"]));
    cases.push(get(format!("/v1/agents/ok?version={long_id}")).wants(404, &["not found"]));
    cases.push(get("/v1/agents/ok?colour=red").wants(400, &["colour"]));
    for query in [
        "since=abc",
        "since=1.5",
        "since=1e3",
        "since=99999999999999999999",
        "since=1&since=2",
    ] {
        cases.push(get(format!("/v1/usage?{query}")).wants(400, &["since"]));
        cases.push(get(format!("/v1/agents/ok/usage?{query}")).wants(400, &["since"]));
    }
    for query in ["since=-9223372036854775808", "since=9223372036854775807"] {
        cases.push(get(format!("/v1/usage?{query}")).wants(200, &[]));
        cases.push(get(format!("/v1/agents/ok/usage?{query}")).wants(200, &[]));
    }

    // POST /v1/worker/tasks/lease
    let lease_body = json!({"queue": "q", "wait": "0s", "lease": "30s", "worker": "w"});
    cases.extend(fields(
        "/v1/worker/tasks/lease",
        &lease_body,
        &[
            ("queue", "string"),
            ("worker", "string"),
            ("wait", "string"),
            ("lease", "string"),
        ],
        &["queue"],
        204,
    ));
    for bad in ["\"\"", "\"a b\"", "\"a/b\"", "\"a\\u0000\""] {
        cases.push(
            post("/v1/worker/tasks/lease", with(&lease_body, "queue", bad)).wants(400, &["queue"]),
        );
    }
    cases.push(
        post(
            "/v1/worker/tasks/lease",
            with(&lease_body, "queue", &format!("\"{}\"", "q".repeat(10_000))),
        )
        .wants(400, &["queue"]),
    );
    for field in ["wait", "lease"] {
        for bad in [
            "\"-1s\"",
            "\"abc\"",
            "\"1y\"",
            "\"99999999999999h\"",
            "\"1e400s\"",
            "\"NaN\"",
            "\"\"",
        ] {
            cases.push(
                post("/v1/worker/tasks/lease", with(&lease_body, field, bad)).wants(400, &[field]),
            );
        }
    }
    for bad in [format!("\"{long}\""), "\"a\\u0000b\"".to_string()] {
        cases.push(
            post("/v1/worker/tasks/lease", with(&lease_body, "worker", &bad))
                .wants(400, &["worker"]),
        );
    }
    // (A longer wait is cut to 60 s: not tried here.)
    for (field, value) in [
        ("worker", "\"\"".to_string()),
        ("lease", "\"0ms\"".to_string()),
        ("lease", "\"8760h\"".to_string()),
    ] {
        cases
            .push(post("/v1/worker/tasks/lease", with(&lease_body, field, &value)).wants(204, &[]));
    }

    // POST /v1/worker/tasks/{id}/heartbeat, complete, fail (no such lease: 409)
    let task = format!("/v1/worker/tasks/{unknown}");
    cases.extend(fields(
        &format!("{task}/heartbeat"),
        &json!({"lease_token": "1", "lease": "30s"}),
        &[("lease_token", "string"), ("lease", "string")],
        &["lease_token"],
        409,
    ));
    cases.extend(fields(
        &format!("{task}/complete"),
        &json!({"lease_token": "1", "output": "x"}),
        &[("lease_token", "string"), ("output", "any")],
        &["lease_token", "output"],
        409,
    ));
    cases.extend(fields(
        &format!("{task}/fail"),
        &json!({"lease_token": "1", "error": "x", "retryable": false}),
        &[
            ("lease_token", "string"),
            ("error", "string"),
            ("retryable", "bool"),
        ],
        &["lease_token", "error"],
        409,
    ));
    for (route, body) in worker_bodies() {
        let path = format!("{task}/{route}");
        for bad in [
            "\"abc\"",
            "\"\"",
            "\"99999999999999999999\"",
            "\"1.5\"",
            "\"\\u0000\"",
        ] {
            cases.push(post(&path, with(&body, "lease_token", bad)).wants(400, &["lease_token"]));
        }
    }
    cases.push(
        post(
            format!("{task}/heartbeat"),
            br#"{"lease_token": "1", "lease": "-5s"}"#.to_vec(),
        )
        .wants(400, &["lease"]),
    );
    cases.push(
        post(
            format!("{task}/complete"),
            format!(r#"{{"lease_token": "1", "output": "{long}"}}"#),
        )
        .wants(409, &[]),
    );

    // POST /v1/agents: syntax, and hostile specs.
    let agents = "/v1/agents";
    let yaml = |text: String| post(agents, text).header("content-type", hv("application/yaml"));
    cases.push(post(agents, Vec::new()).wants(400, &["empty"]));
    cases.push(post(agents, b"name: \xff\xfe".to_vec()).wants(400, &["UTF-8"]));
    cases.push(post(agents, b"name: [unclosed".to_vec()).wants(400, &["YAML"]));
    cases.push(post(agents, b"\x00".to_vec()).wants(400, &["YAML"]));
    cases.push(post(agents, b"- 1\n- 2\n".to_vec()).wants(422, &["mapping"]));
    cases.push(post(agents, b"12".to_vec()).wants(422, &["mapping"]));
    cases.push(yaml(nested(10_000)).wants(400, &["recursion limit"]));
    cases.push(yaml(format!("name: a\nx: {}", "{a: ".repeat(10_000))).wants(400, &["YAML"]));
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (name, previous) in ["b", "c", "d", "e", "f", "g", "h", "i"]
        .iter()
        .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
    {
        let refs = vec![format!("*{previous}"); 9].join(",");
        laughs.push_str(&format!("{name}: &{name} [{refs}]\n"));
    }
    cases.push(yaml(laughs.clone()).wants(400, &["YAML"]));
    // Padding raises a per-event repetition budget: the bomb must still fail.
    let padding = format!("pad: [{}]\n", vec!["0"; 300_000].join(","));
    cases.push(yaml(format!("{padding}{laughs}")).wants(400, &["YAML"]));
    let long_text = format!("\"{}\"", "x".repeat(400_000));
    cases.push(
        yaml(format!(
            "a: &a {long_text}\nb: [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
        ))
        .wants(400, &["YAML"]),
    );
    let spec = |name: &str, parameters: &str| {
        format!(
            "name: {name}\nversion: 1\nmodel: {{provider: openai, model: 'tools:1', base_url: '{}'}}\ntools:\n  - name: t\n    http: {{url: '{}'}}\n    parameters: {parameters}\n",
            mock.llm_url(),
            mock.tool_url("echo")
        )
    };
    for (name, parameters, status) in [
        (
            "regex-bad",
            r#"{type: object, properties: {n: {type: string, pattern: "(["}}}"#,
            422,
        ),
        (
            "regex-huge",
            r#"{type: object, properties: {n: {type: string, pattern: "a{1000}{1000}{1000}"}}}"#,
            201,
        ),
        (
            "regex-props",
            r#"{type: object, patternProperties: {"(?<": {}}}"#,
            422,
        ),
        (
            "ref-remote",
            r#"{type: object, properties: {n: {"$ref": "http://127.0.0.1:9/schema.json"}}}"#,
            422,
        ),
        (
            "ref-file",
            r#"{type: object, properties: {n: {"$ref": "file:///etc/passwd"}}}"#,
            422,
        ),
        (
            "ref-missing",
            r##"{type: object, properties: {n: {"$ref": "#/$defs/nope"}}}"##,
            422,
        ),
        (
            "ref-loop",
            r##"{type: object, "$defs": {a: {"$ref": "#/$defs/b"}, b: {"$ref": "#/$defs/a"}}, properties: {n: {"$ref": "#/$defs/a"}}}"##,
            201,
        ),
        ("not-object", r#"{type: array}"#, 422),
        (
            "bad-type",
            r#"{type: object, properties: {n: {type: 12}}}"#,
            422,
        ),
        (
            "regex-slow",
            r#"{type: object, properties: {n: {type: string, pattern: "^(a+)+$"}}}"#,
            201,
        ),
        (
            "regex-backref",
            r#"{type: object, properties: {n: {type: string, pattern: "^(a|aa)+\\1$"}}}"#,
            201,
        ),
        (
            "ref-self",
            r##"{type: object, properties: {n: {"$ref": "#"}}}"##,
            201,
        ),
    ] {
        let words: &[&str] = if status == 422 {
            &["tools[0].parameters"]
        } else {
            &[]
        };
        cases.push(yaml(spec(name, parameters)).wants(status, words));
    }
    for (extra, words) in [
        ("limits: {max_steps: -1}", "limits.max_steps"),
        ("limits: {max_steps: 1.5}", "limits.max_steps"),
        ("limits: {timeout: 1e300}", "limits.timeout"),
        ("limits: {timeout: '99999999999999h'}", "limits.timeout"),
        ("retry: {max_attempts: 4294967296}", "retry.max_attempts"),
        ("description: [1, 2]", "description"),
        ("colour: red", "colour"),
    ] {
        let text = format!("{}{extra}\n", spec("numbers", "{type: object}"));
        cases.push(yaml(text).wants(422, &[words]));
    }
    cases.push(
        yaml(format!(
            "{}limits: {{max_steps: 99999999999999999999}}\n",
            spec("big", "{type: object}")
        ))
        .wants(400, &["limits.max_steps"]),
    );
    cases.push(yaml(spec("\"a\\0b\"", "{type: object}")).wants(422, &["name"]));
    cases.push(
        yaml(format!(
            "{}limits: {{max_cost: .nan}}\n",
            spec("nan", "{type: object}")
        ))
        .wants(400, &["not a number"]),
    );
    cases.push(
        yaml(format!(
            "{}description: \"nul \\0 here\"\n",
            spec("nul", "{type: object}")
        ))
        .wants(422, &["description", "U+0000"]),
    );
    cases.push(
        yaml(format!(
            "{}description: {long_text}\n",
            spec("wordy", "{type: object}")
        ))
        .wants(201, &[]),
    );

    // Bodies over the limit, on every route that reads one.
    for path in [
        "/v1/runs".to_string(),
        "/v1/agents".to_string(),
        cancel.clone(),
        decide.clone(),
        "/v1/worker/tasks/lease".to_string(),
        format!("{task}/heartbeat"),
        format!("{task}/complete"),
        format!("{task}/fail"),
    ] {
        let r = reqwest::Client::new()
            .post(server.url(&path))
            .body(vec![b' '; 2 * 1024 * 1024])
            .send()
            .await
            .expect("post");
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(status, 413, "{path}: {body}");
        assert_eq!(body["error"]["code"], "too_large", "{path}: {body}");
    }

    // Routes without a body or query ignore both; wrong methods and paths.
    for path in [
        "/healthz",
        "/readyz",
        "/v1/agents",
        "/v1/providers",
        "/v1/dlq",
    ] {
        cases.push(get(format!("{path}?colour=red&limit=-1")).wants(200, &[]));
    }
    for (method, path) in [
        (Method::DELETE, "/v1/runs".to_string()),
        (Method::PUT, "/v1/agents".to_string()),
        (Method::GET, "/v1/worker/tasks/lease".to_string()),
        (Method::POST, "/healthz".to_string()),
        (Method::PATCH, format!("/v1/runs/{done}")),
    ] {
        cases.push(case(method, path, Vec::new()).wants(405, &["method"]));
    }
    cases.push(get("/v1/runs/").wants(404, &["route"]));
    cases.push(get("/v2/runs").wants(404, &["route"]));
    cases.push(get(format!("/v1/runs/{done}/events/extra")).wants(404, &["route"]));

    let failures = run(server, cases).await;
    assert!(
        failures.is_empty(),
        "{} hostile requests were answered wrongly:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Still up, and a valid run still runs.
    let r = http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    let id = submit(&http, server, "ok", "after all that").await;
    let run = wait_terminal(&http, server, &id, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");
}

#[tokio::test]
async fn every_route_refuses_hostile_input_clearly_on_sqlite() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    hostile_requests(&server, &mock).await;
}

#[tokio::test]
async fn every_route_refuses_hostile_input_clearly_on_postgres() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--database-url", &db.url]).await;
    hostile_requests(&server, &mock).await;
}

/// A model answering absurdly (see `keel::mock`, model `absurd`): text with
/// U+0000, calls with an empty id, an id used twice, no tool name and a NUL
/// for arguments, then 1 MB of text with U+0000. The run completes, the
/// bad calls are errors the model reads, the journal keeps the exact text.
async fn absurd_answers(server: &Server, mock: &Mock) {
    let http = reqwest::Client::new();
    register(
        &http,
        server,
        &agent_yaml("absurd", mock, "absurd", "echo", ""),
    )
    .await;
    let id = submit(&http, server, "absurd", "anything").await;
    let run = wait_terminal(&http, server, &id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "COMPLETED", "{}", clip(&run.to_string()));
    let output = run["output"].as_str().unwrap_or("");
    assert!(output.len() > 1024 * 1024, "{} bytes", output.len());
    assert!(output.starts_with("nul \u{0} then"), "{}", clip(output));
    let calls = run["steps"][0]["tool_calls"].as_array().expect("calls");
    assert_eq!(calls.len(), 3, "{calls:?}");
    let ids: Vec<&str> = calls
        .iter()
        .map(|c| c["call_id"].as_str().unwrap_or(""))
        .collect();
    assert!(!ids[0].is_empty(), "an empty id is made up: {ids:?}");
    assert_eq!(ids[1..], ["dup", "dup"]);
    assert_eq!(
        (
            calls[0]["is_error"].as_bool(),
            calls[1]["is_error"].as_bool()
        ),
        (Some(false), Some(false))
    );
    assert_eq!(calls[2]["is_error"], true);
    assert!(
        calls[2]["result"]
            .as_str()
            .unwrap_or("")
            .contains("unknown tool"),
        "{}",
        calls[2]
    );
    assert_eq!(
        mock.counters
            .tool_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // The listing's copy of the output (a run row) may hold U+FFFD for U+0000.
    let list = get_json(&http, &server.url("/v1/runs?agent=absurd")).await;
    let listed = list["runs"][0]["output"].as_str().unwrap_or("");
    assert!(listed.starts_with("nul \u{0} then") || listed.starts_with("nul \u{fffd} then"));
    let events = sse(&http, &server.url(&format!("/v1/runs/{id}/events")), None).await;
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("run_completed"));
    let r = http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn absurd_model_answers_never_stop_a_worker_on_sqlite() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &[]).await;
    absurd_answers(&server, &mock).await;
}

#[tokio::test]
async fn absurd_model_answers_never_stop_a_worker_on_postgres() {
    let Some(db) = PgDb::create().await else {
        return;
    };
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let server = Server::start(&dir.db(), &["--database-url", &db.url]).await;
    absurd_answers(&server, &mock).await;
}

/// Stored data that does not decode (an agent version, a journal event)
/// fails its run's task on each attempt, then parks it in the dead-letter
/// queue, naming why; the process stays up and other runs flow.
#[tokio::test]
async fn stored_data_that_does_not_decode_parks_its_task() {
    use sqlx::Connection;
    let mock = Mock::start().await.expect("mock");
    mock.counters
        .llm_latency_ms
        .store(60_000, std::sync::atomic::Ordering::Relaxed);
    let dir = TempDir::new();
    let http = reqwest::Client::new();
    let mut server = Server::start(&dir.db(), &[]).await;
    for name in ["bent", "torn", "fine"] {
        register(
            &http,
            &server,
            &agent_yaml(name, &mock, "tools:1", "echo", "retry: {max_attempts: 2}"),
        )
        .await;
    }
    let bent = submit(&http, &server, "bent", "x").await;
    let torn = submit(&http, &server, "torn", "x").await;
    // Both are waiting for the model when the process dies.
    let deadline = Instant::now() + Duration::from_secs(10);
    while mock
        .counters
        .llm_requests
        .load(std::sync::atomic::Ordering::Relaxed)
        < 2
    {
        assert!(Instant::now() < deadline, "the model was never called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    mock.counters
        .llm_latency_ms
        .store(0, std::sync::atomic::Ordering::Relaxed);

    let url = format!("sqlite://{}", dir.db().display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.expect("open");
    sqlx::query("UPDATE agents SET spec = '{\"name\": 5}' WHERE name = 'bent'")
        .execute(&mut db)
        .await
        .expect("break the agent");
    sqlx::query(
        "UPDATE events SET data = '{\"type\": \"no_such_event\"}' WHERE run_id = ? AND seq = 1",
    )
    .bind(&torn)
    .execute(&mut db)
    .await
    .expect("break the journal");
    let _ = db.close().await;

    let mut server = Server::start(&dir.db(), &[]).await;
    let fine = submit(&http, &server, "fine", "x").await;
    let run = wait_terminal(&http, &server, &fine, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "COMPLETED", "{run}");

    // Each broken run's task is retried, then parked with the reason.
    let deadline = Instant::now() + Duration::from_secs(30);
    let letters = loop {
        let dlq = get_json(&http, &server.url("/v1/dlq")).await;
        let letters = dlq["dead_letters"].as_array().cloned().unwrap_or_default();
        if letters.len() == 2 {
            break letters;
        }
        assert!(Instant::now() < deadline, "not parked: {dlq}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for letter in &letters {
        let error = letter["error"].as_str().unwrap_or("");
        assert!(error.contains("stored data does not decode"), "{letter}");
        assert_eq!(letter["attempts"], 2, "{letter}");
    }
    let runs: Vec<&str> = letters
        .iter()
        .filter_map(|l| l["run_id"].as_str())
        .collect();
    assert!(
        runs.contains(&bent.as_str()) && runs.contains(&torn.as_str()),
        "{runs:?}"
    );
    // The intact journal still reads; the broken one is a server error, in JSON.
    let view = get_json(&http, &server.url(&format!("/v1/runs/{bent}"))).await;
    assert!(
        view["error"]
            .as_str()
            .unwrap_or("")
            .contains("does not decode"),
        "{view}"
    );
    let r = http
        .get(server.url(&format!("/v1/runs/{torn}")))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 500);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "internal");
    let r = http
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    assert!(
        matches!(server.child.try_wait(), Ok(None)),
        "the server exited"
    );
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
    server.kill();
}
