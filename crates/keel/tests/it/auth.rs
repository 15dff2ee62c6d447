//! API tokens: with KEEL_API_TOKEN set, `keel serve` answers 401 to every
//! request without one of its tokens (but the probes and the OpenAPI
//! document), the CLI and the Python worker example send it, a token too
//! short to be safe is refused at start, and no token reaches the log.

use std::process::Command;
use std::time::Duration;

use keel::mock::Mock;
use serde_json::{Value, json};

use crate::support::*;

const NEW: &str = "k33l-new-0123456789abcdef0123456789";
const OLD: &str = "k33l-old-0123456789abcdef0123456789";

/// The status and JSON body of a GET with `token` (none: no header).
async fn get(http: &reqwest::Client, url: &str, token: Option<&str>) -> (u16, Value, String) {
    let mut request = http.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let r = request.send().await.expect("get");
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = r.json().await.unwrap_or(Value::Null);
    (status, body, challenge)
}

#[tokio::test]
async fn requests_need_a_token_and_the_cli_and_workers_send_it() {
    let mock = Mock::start().await.expect("mock");
    let dir = TempDir::new();
    let tokens = format!("{NEW}, {OLD}");
    let server = Server::start_with_env(&dir.db(), &[], &[("KEEL_API_TOKEN", &tokens)]).await;
    let http = reqwest::Client::new();

    // The probes and the API's description are open.
    for path in ["/healthz", "/readyz", "/openapi.json"] {
        let (status, _, _) = get(&http, &server.url(path), None).await;
        assert_eq!(status, 200, "{path}");
    }
    // Everything else needs a token: none, a wrong one, or another scheme is 401.
    for path in ["/v1/runs", "/v1/agents", "/metrics", "/v1/dlq", "/nope"] {
        let (status, body, challenge) = get(&http, &server.url(path), None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("KEEL_API_TOKEN")
        );
        assert_eq!(challenge, "Bearer");
    }
    let (status, body, _) = get(
        &http,
        &server.url("/v1/runs"),
        Some("k33l-wrong-0123456789"),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let r = http
        .get(server.url("/v1/runs"))
        .basic_auth("keel", Some(NEW))
        .send()
        .await
        .expect("basic");
    assert_eq!(r.status(), 401);
    let r = http
        .post(server.url("/v1/runs"))
        .json(&json!({"agent": "a", "input": "x"}))
        .send()
        .await
        .expect("submit");
    assert_eq!(r.status(), 401, "a submit without a token creates nothing");
    // Both tokens of a rollout work.
    for token in [NEW, OLD] {
        let (status, body, _) = get(&http, &server.url("/v1/runs"), Some(token)).await;
        assert_eq!(status, 200, "{body}");
    }

    // The CLI sends the first of the tokens it is given; without, it says why.
    let spec = dir.0.join("worker.yaml");
    std::fs::write(&spec, worker_agent("ext", &mock, "")).expect("write spec");
    let url = server.url.clone();
    let spec_arg = spec.to_string_lossy().into_owned();
    let env_tokens = tokens.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        keel_with_env(
            &["agents", "apply", &spec_arg, "--server", &url],
            &[("KEEL_API_TOKEN", &env_tokens)],
        )
    })
    .await
    .expect("join");
    assert!(ok, "stdout:\n{out}\nstderr:\n{err}");
    let url = server.url.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || keel(&["runs", "--server", &url]))
        .await
        .expect("join");
    assert!(!ok, "{out}");
    assert!(
        err.contains("401") && err.contains("KEEL_API_TOKEN"),
        "{err}"
    );

    // The Python worker example, with the token in its environment.
    let body = json!({"agent": "ext", "input": "resize it"});
    let bearer = format!("Bearer {OLD}");
    let id = submit_with(
        &http,
        server.url("/v1/runs"),
        &body,
        &[("authorization", &bearer)],
    )
    .await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/workers/python_worker.py"
    );
    let url = server.url.clone();
    let worker_tokens = tokens.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([script, &url, "images", "--once"])
            .env("KEEL_API_TOKEN", &worker_tokens)
            .output()
            .expect("run python3")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "python worker: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, run, _) = get(&http, &server.url(&format!("/v1/runs/{id}")), Some(NEW)).await;
        if run["status"] == "COMPLETED" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{run}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    assert!(
        !log.contains(NEW) && !log.contains(OLD),
        "a token in the log"
    );
}

#[tokio::test]
async fn a_token_too_short_to_be_safe_stops_the_server_at_start() {
    let dir = TempDir::new();
    let db = dir.db().to_string_lossy().into_owned();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        keel_with_env(
            &["serve", "--listen", "127.0.0.1:0", "--db", &db],
            &[("KEEL_API_TOKEN", "hunter2")],
        )
    })
    .await
    .expect("join");
    assert!(!ok);
    assert!(
        err.contains("KEEL_API_TOKEN") && err.contains("16 characters"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}
